"""The lite set that ships in checkpoints/lite/ loads offline and recognises real birds."""
from __future__ import annotations

import pytest

from birdfg import checkpoints
from birdfg.inference import Engine
from birdfg.data import class_names, samples
from conftest import SHIPPED_LITE

# Val photos that every shipped model gets right (checked when the set was trained); a
# regression in loading, preprocessing or the backbone mapping breaks them at once.
N_PHOTOS = 6


@pytest.fixture(scope="module")
def shipped():
    model_set = checkpoints.load_set(SHIPPED_LITE)
    if not model_set.complete:
        pytest.fail(f"checkpoints/lite is incomplete: {model_set.errors}")
    return model_set


def test_shipped_set_is_small_and_self_describing(shipped):
    total = sum(p.stat().st_size for p in SHIPPED_LITE.glob("*.safetensors"))
    assert total <= 40 * 2**20
    for key, loaded in shipped.models.items():
        assert loaded.spec.key == key and len(loaded.classes) == 20
        assert loaded.val_accuracy >= 0.90
        assert "train.py" in loaded.meta["trained"]["command"]


def test_shipped_models_classify_real_val_photos(shipped, bird_data):
    engine = Engine(shipped)
    classes = class_names(bird_data)
    assert classes == engine.classes
    items = samples(bird_data, "val", classes)
    picked = [items[i] for i in range(0, len(items), len(items) // N_PHOTOS)][:N_PHOTOS]
    wrong = {}
    for item in picked:
        result = engine.compare(item.path)
        for key in shipped.models:
            if result.predicted(key) != item.label:
                wrong.setdefault(key, []).append(item.path.name)
    # Each model is >= 90 % accurate on val: allow one miss among the photos, not more.
    assert all(len(v) <= 1 for v in wrong.values()), wrong
