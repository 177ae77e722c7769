"""Hostile checkpoints: pickles planted in a checkpoints folder (whose unpickling would create a
file), safetensors with wrong shapes or tampered metadata, truncated or foreign files, a set with
two of its three models. Each is refused or skipped with a message naming the file; the planted
code never runs; the rest of the set still loads and classifies."""
from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, TINY_CLASSES, synthetic_photo
from birdfg import checkpoints
from birdfg.checkpoints import CheckpointError


class _TouchOnUnpickle:
    """Unpickling this calls pathlib.Path(marker).touch(): planted code that leaves a trace."""

    def __init__(self, marker: Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _TouchOnUnpickle(marker)})


def torch_payload(marker: Path) -> bytes:
    """The same trap in torch.save's zip format (what a .pt / Lightning .ckpt file looks like)."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": _TouchOnUnpickle(marker)}, buf)
    return buf.getvalue()


@pytest.fixture()
def model_set(untrained_lite_set, tmp_path) -> Path:
    """A private copy of a real 3-model lite set to spoil."""
    folder = tmp_path / "sets" / "lite"
    shutil.copytree(untrained_lite_set, folder)
    return folder


def test_the_planted_payloads_are_live(tmp_path):
    """Guard for the tests below: unpickling these bytes really does create the file."""
    marker = tmp_path / "ran.txt"
    pickle.loads(pickle_payload(marker))
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(torch_payload(marker)), weights_only=False)
    assert marker.exists()


def test_planted_pickles_never_run_and_the_set_still_loads(model_set, tmp_path):
    marker = tmp_path / "PWNED"
    planted = {"evil.pt": torch_payload(marker), "last.ckpt": torch_payload(marker),
               "model.pth": pickle_payload(marker), "pytorch_model.bin": torch_payload(marker),
               "weights.pkl": pickle_payload(marker), "cnn.safetensors": torch_payload(marker),
               "vit.safetensors.pt": pickle_payload(marker)}
    for name, data in planted.items():
        (model_set / name).write_bytes(data)

    loaded = checkpoints.load_set(model_set)
    for name in planted:
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            checkpoints.load(model_set / name)
    sets = checkpoints.find_sets(model_set.parent)

    assert not marker.exists(), "a planted pickle was unpickled"
    assert set(loaded.models) == {"vit", "bcnn"}
    for name in ("evil.pt", "last.ckpt", "model.pth", "pytorch_model.bin", "weights.pkl", "cnn.safetensors"):
        assert name in loaded.errors and name in loaded.errors[name], (name, loaded.errors.get(name))
    assert "safetensors" in loaded.errors["cnn.safetensors"]
    assert sets == {"lite": model_set}

    # The two good models of the spoiled folder still classify.
    from birdfg.inference import Engine

    result = Engine(loaded).compare(synthetic_photo(1, 3, (200, 150)))
    assert set(result.to_json()["models"]) == {"vit", "bcnn"} and result.ensemble_probs is not None
    assert not marker.exists()


def test_a_set_with_two_of_three_models(model_set):
    from birdfg.inference import Engine

    (model_set / "bcnn.safetensors").unlink()
    loaded = checkpoints.load_set(model_set)
    assert set(loaded.models) == {"cnn", "vit"} and not loaded.complete
    assert "bcnn.safetensors" in loaded.errors["bcnn.safetensors"]
    assert "missing" in loaded.errors["bcnn.safetensors"] and "--models bcnn" in loaded.errors["bcnn.safetensors"]
    payload = Engine(loaded).compare(synthetic_photo(0, 5, (200, 150))).to_json()
    assert set(payload["models"]) == {"cnn", "vit"} and len(payload["ensemble"]["top5"]) == len(TINY_CLASSES)


# --- tampered safetensors: (name, which file to spoil, how, a fragment the message must contain) ---

def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _meta_edit(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    """Spoil the decoded metadata with `edit`, write it back as a valid safetensors file."""

    def spoil(src: Path, dst: Path) -> None:
        tensors, raw = _read(src)
        meta = {k: json.loads(v) for k, v in raw.items()}
        edit(meta)
        save_file(tensors, str(dst), metadata={k: json.dumps(v) for k, v in meta.items()})

    return spoil


def _raw_meta_edit(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def spoil(src: Path, dst: Path) -> None:
        tensors, raw = _read(src)
        edit(raw)
        save_file(tensors, str(dst), metadata=raw)

    return spoil


def _tensor_edit(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def spoil(src: Path, dst: Path) -> None:
        tensors, raw = _read(src)
        edit(tensors)
        save_file(tensors, str(dst), metadata=raw)

    return spoil


def _bytes(make: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def spoil(src: Path, dst: Path) -> None:
        dst.write_bytes(make(src.read_bytes()))

    return spoil


def _set(path: str, value):
    """An edit that sets meta[a][b]... = value for path 'a.b'."""
    keys = path.split(".")

    def edit(meta: dict) -> None:
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return edit


def _del(key: str):
    return lambda meta: meta.pop(key)


def _header_bomb(data: bytes) -> bytes:
    return (2 ** 62).to_bytes(8, "little") + data[8:]


def _garbage_header(data: bytes) -> bytes:
    body = b'{"head.fc.weight": {"dtype": "F32", "shape": [3, 1280], "data_offsets": [0, 99999999999]}}'
    return len(body).to_bytes(8, "little") + body


def _jpeg(_: bytes) -> bytes:
    buf = io.BytesIO()
    synthetic_photo(0, 1).save(buf, "JPEG")
    return buf.getvalue()


TAMPERED = [
    # Wrong weights.
    ("wrong-shape", "cnn", _tensor_edit(lambda t: t.update({"head.fc.weight": torch.zeros(5, 1280)})), "shape"),
    ("missing-tensor", "cnn", _tensor_edit(lambda t: t.pop("head.fc.bias")), "missing"),
    ("extra-tensor", "cnn", _tensor_edit(lambda t: t.update({"backbone.conv_stem.weight": torch.zeros(32, 3, 3, 3)})),
     "unexpected"),
    ("renamed-tensor", "vit", _tensor_edit(lambda t: t.update({"head.evil": t.pop("head.fc.bias")})), "missing"),
    ("nan-weights", "cnn", _tensor_edit(lambda t: t["head.fc.weight"].fill_(float("nan"))), "NaN"),
    ("inf-weights", "bcnn", _tensor_edit(lambda t: t["head.fc.bias"].fill_(float("inf"))), "NaN"),
    # Tampered metadata.
    ("bad-json", "cnn", _raw_meta_edit(lambda m: m.update({"spec": '{"key": "cnn", '})), "JSON"),
    ("missing-classes", "cnn", _meta_edit(_del("classes")), "classes"),
    ("missing-spec", "cnn", _meta_edit(_del("spec")), "spec"),
    ("no-metadata", "cnn", _raw_meta_edit(lambda m: m.clear()), "not a birdfg checkpoint"),
    ("other-format", "cnn", _meta_edit(_set("format", "birdfg/99")), "format"),
    ("unknown-head", "cnn", _meta_edit(_set("spec.head", "mlp")), "head"),
    ("unknown-backbone", "cnn", _meta_edit(_set("spec.backbone", "resnet9000")), "backbone"),
    ("unknown-spec-field", "cnn", _meta_edit(_set("spec.evil", 1)), "evil"),
    ("spec-missing-field", "cnn", _meta_edit(lambda m: m["spec"].pop("num_classes")), "num_classes"),
    ("spec-not-an-object", "cnn", _meta_edit(_set("spec", ["cnn"])), "spec"),
    ("classes-vs-spec", "cnn", _meta_edit(_set("classes", [f"{i:03d}.Bird_{i}" for i in range(5)])), "class"),
    ("wrong-class-count", "cnn", _meta_edit(lambda m: (m["spec"].update(num_classes=5),
                                                       m.update(classes=[f"{i:03d}.B" for i in range(5)]))), "shape"),
    ("classes-not-names", "cnn", _meta_edit(_set("classes", "abc")), "classes"),
    ("duplicate-classes", "cnn", _meta_edit(_set("classes", ["001.A", "001.A", "002.B"])), "classes"),
    ("head-kwargs-mismatch", "vit", _meta_edit(_set("spec.head_kwargs.depth", 3)), "missing"),
    ("huge-input-size", "cnn", _meta_edit(lambda m: (m["spec"].update(img_size=60000),
                                                     m["preprocess"].update(input_size=[3, 60000, 60000]))), "size"),
    ("preprocess-size-differs", "cnn", _meta_edit(_set("preprocess.input_size", [3, 999, 999])), "size"),
    ("preprocess-missing-mean", "cnn", _meta_edit(lambda m: m["preprocess"].pop("mean")), "mean"),
    ("preprocess-zero-std", "cnn", _meta_edit(_set("preprocess.std", [0.0, 0.0, 0.0])), "std"),
    ("preprocess-zero-crop", "cnn", _meta_edit(_set("preprocess.crop_pct", 0)), "crop_pct"),
    ("preprocess-bad-interpolation", "cnn", _meta_edit(_set("preprocess.interpolation", "magic")), "interpolation"),
    ("metrics-not-an-object", "cnn", _meta_edit(_set("metrics", [0.9])), "metrics"),
    ("display-name-not-text", "cnn", _meta_edit(_set("display_name", {"html": "<script>"})), "display_name"),
    # Not safetensors at all, or damaged.
    ("empty-file", "cnn", _bytes(lambda d: b""), "cnn.safetensors"),
    ("jpeg-named-safetensors", "cnn", _bytes(_jpeg), "safetensors"),
    ("text-named-safetensors", "cnn", _bytes(lambda d: b"hello, I am not a model\n" * 10), "safetensors"),
    ("random-bytes", "cnn", _bytes(lambda d: os.urandom(4096)), "safetensors"),
    ("pickle-named-safetensors", "cnn", _bytes(lambda d: pickle.dumps({"w": [1.0, 2.0]})), "safetensors"),
    ("header-length-bomb", "cnn", _bytes(_header_bomb), "safetensors"),
    ("offsets-past-the-end", "cnn", _bytes(_garbage_header), "safetensors"),
    ("truncated-in-header", "vit", _bytes(lambda d: d[:200]), "safetensors"),
    ("truncated-in-weights", "vit", _bytes(lambda d: d[:len(d) // 2]), "vit.safetensors"),
    ("truncated-last-byte", "bcnn", _bytes(lambda d: d[:-1]), "bcnn.safetensors"),
]


@pytest.mark.parametrize("name,key,spoil,fragment", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_tampered_checkpoint_is_refused_with_a_message_naming_it(name, key, spoil, fragment, untrained_lite_set,
                                                                 tmp_path, _shared_backbones):
    path = tmp_path / f"{key}.safetensors"
    spoil(untrained_lite_set / f"{key}.safetensors", path)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load(path, _shared_backbones)
    message = str(info.value)
    assert str(path) in message, message
    assert fragment in message, f"{name}: {message!r} lacks {fragment!r}"


@pytest.fixture(scope="module")
def _shared_backbones() -> dict:
    """One Lite0 backbone for all the load() calls above, as load_set shares it."""
    return {}


def test_tampered_files_are_skipped_by_load_set_and_the_others_load(model_set, untrained_lite_set):
    """A wrong key (the vit file saved as cnn.safetensors) and a spoiled file in one folder."""
    shutil.copyfile(untrained_lite_set / "vit.safetensors", model_set / "cnn.safetensors")
    _meta_edit(_set("spec.head", "mlp"))(untrained_lite_set / "bcnn.safetensors", model_set / "bcnn.safetensors")
    loaded = checkpoints.load_set(model_set)
    assert set(loaded.models) == {"vit"}
    assert "holds model 'vit', not 'cnn'" in loaded.errors["cnn.safetensors"]
    assert "bcnn.safetensors" in loaded.errors["bcnn.safetensors"]


def test_a_checkpoint_from_another_class_list_is_skipped(model_set, untrained_lite_set):
    _meta_edit(_set("classes", ["001.A", "002.B", "003.C"]))(untrained_lite_set / "bcnn.safetensors",
                                                            model_set / "bcnn.safetensors")
    loaded = checkpoints.load_set(model_set)
    assert set(loaded.models) == {"cnn", "vit"}
    assert "class list differs" in loaded.errors["bcnn.safetensors"]


HUGE_SPECS = {
    # If built for real: a 4096-wide transformer head (~1.1 GB) and a 200k-class linear head (~1 GB).
    "vit": lambda m: m["spec"]["head_kwargs"].update(dim=4096),
    "cnn": lambda m: (m["spec"].update(num_classes=200_000), m.update(classes=[f"c{i}" for i in range(200_000)])),
}
_HUGE_PROBE = """
import json, sys
from birdfg import checkpoints
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
backbones = {}
checkpoints.load(sys.argv[1], backbones)  # a good file first: torch, timm and the backbone in memory
before, out = hwm(), {}
for path in sys.argv[2:]:
    try:
        checkpoints.load(path, backbones)
        out[path] = "loaded"
    except checkpoints.CheckpointError as exc:
        out[path] = str(exc)
print(json.dumps({"growth_mb": hwm() - before, "results": out}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to measure peak memory")
def test_a_spec_asking_for_a_huge_model_is_refused_before_allocating_it(untrained_lite_set, tmp_path):
    paths = []
    for key, edit in HUGE_SPECS.items():
        path = tmp_path / key / f"{key}.safetensors"
        path.parent.mkdir()
        _meta_edit(edit)(untrained_lite_set / f"{key}.safetensors", path)
        paths.append(str(path))
    out = subprocess.run([sys.executable, "-c", _HUGE_PROBE, str(untrained_lite_set / "cnn.safetensors"), *paths],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for path in paths:
        assert "shape" in report["results"][path] and path in report["results"][path], report["results"][path]
    print(f"\nrefusing the huge specs grew peak memory by {report['growth_mb']:.0f} MB")
    assert report["growth_mb"] < 200, f"refusing the huge specs cost {report['growth_mb']:.0f} MB"


def test_resume_never_unpickles_a_planted_run_checkpoint(tmp_path):
    """`train.py --resume` reads OUTPUT/.runs/<preset>/<key>/last.ckpt, a Lightning pickle. One
    planted there must not run: resuming loads it with weights_only=True and says what to do."""
    from birdfg.models import build, preset_specs
    from birdfg.training import FeatureViews, TrainConfig, fit

    marker = tmp_path / "PWNED"
    run_dir = tmp_path / ".runs" / "lite" / "cnn"
    run_dir.mkdir(parents=True)
    (run_dir / "last.ckpt").write_bytes(torch_payload(marker))
    model = build(preset_specs("lite", 3, ("cnn",), img_size=64)["cnn"], pretrained=False)
    features = FeatureViews(torch.randn(1, 12, 1280, 2, 2), torch.arange(12) % 3)
    cfg = TrainConfig(epochs=1, batch_size=4, logger="none", workers=0, resume=True, accelerator="cpu")
    with pytest.raises(CheckpointError) as info:
        fit(model, features, features, cfg, run_dir)
    assert not marker.exists(), "the planted last.ckpt was unpickled"
    assert str(run_dir / "last.ckpt") in str(info.value) and "--resume" in str(info.value)
