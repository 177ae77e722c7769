"""Self-training: the unlabelled photos a trained set is sure of, as extra train photos.

`train.py --pseudo-labels TEACHER_SET` runs the teacher set on every photo of `DATA/test_images/`
(the dataset's unlabelled photos) and adds to the train photos each one whose ensemble probability
(the mean of the models' softmaxes, as in the app) reaches `--pseudo-threshold`, labelled with
that species. The held-out photos are never looked at, so the val (or CUB test) figure stays fair.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from birdfg.checkpoints import load_set
from birdfg.data import SPLIT_DIRS, DatasetError, Sample, drop_unreadable, samples
from birdfg.images import open_rgb
from birdfg.models import ENSEMBLE_KEY


@dataclass(frozen=True)
class PseudoLabels:
    samples: list[Sample]  # the photos kept, each labelled with the teacher's answer
    unlabelled: int  # the readable unlabelled photos the teacher saw
    threshold: float

    def summary(self) -> dict:
        """What a checkpoint's metadata records of them (`trained.pseudo_labels`)."""
        return {"photos": len(self.samples), "of": self.unlabelled, "threshold": self.threshold}


def pseudo_label(teacher: Path, data: Path, classes: list[str], threshold: float, batch: int = 16) -> PseudoLabels:
    """The photos of `data`'s test_images/ whose `teacher` ensemble probability is >= `threshold`."""
    from birdfg.inference import Engine  # the inference package is heavy; train.py --help stays quick

    model_set = load_set(teacher)
    if not model_set.models:
        raise DatasetError(f"--pseudo-labels {teacher}: no usable checkpoint there "
                           f"({'; '.join(model_set.errors.values()) or 'no .safetensors files'}); "
                           "pass the folder of a trained set, e.g. checkpoints/lite.")
    # torch, not ONNX Runtime: the teacher's folder is only read (no graph cache written there).
    engine = Engine(model_set, runtime="torch", warm_up=False)
    if engine.classes != classes:
        raise DatasetError(f"--pseudo-labels {teacher}: that set knows {len(engine.classes)} classes "
                           f"({', '.join(engine.classes[:3])}, ...), not the {len(classes)} class folders of "
                           f"{Path(data) / SPLIT_DIRS['train']}; pass a set trained on this dataset.")
    folder = Path(data) / SPLIT_DIRS["test"]
    photos = drop_unreadable(samples(data, "test", classes), "unlabelled") if folder.is_dir() else []
    if not photos:
        raise DatasetError(f"{folder}: no unlabelled photos to pseudo-label; put them there (any depth), "
                           "or train without --pseudo-labels.")
    kept = []
    for i in tqdm(range(0, len(photos), batch), desc=f"pseudo-labelling with {teacher}", unit="batch"):
        chunk = photos[i:i + batch]
        for sample, comparison in zip(chunk, engine.run([open_rgb(s.path) for s in chunk])):
            probs = comparison.probs(ENSEMBLE_KEY)
            if probs is not None and probs.max() >= threshold:
                kept.append(Sample(sample.path, int(np.argmax(probs))))
    return PseudoLabels(kept, len(photos), threshold)
