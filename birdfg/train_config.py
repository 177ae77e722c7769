"""`TrainConfig`: every setting of one training run, typed. `train.py` builds it once from its
command line; `train_set`, `fit` and the data module read what they need from it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from birdfg.models import MODEL_KEYS, TRAINING_DEFAULTS, default_epochs


@dataclass(frozen=True)
class TrainConfig:
    """The defaults are train.py's. `epochs`, `lr` and `backbone_lr_scale` left at None (or 0)
    take the preset's value from `TRAINING_DEFAULTS`, per model for the epochs (`for_model`)."""

    # What to train, on what.
    data: Path | None = None
    preset: str = "full"
    models: tuple[str, ...] = MODEL_KEYS
    img_size: int | None = None  # None: the preset's input size
    backbone: str | None = None  # None: the preset's trunk (e.g. tf_efficientnet_lite1 instead of lite0)
    train_from: str | None = None  # None: the preset's first fine-tuned stage (e.g. blocks.5 instead of blocks.6)
    output_stride: int | None = None  # None: the trunk's own (32); 16 gives a grid twice as fine
    pretrained: bool = True  # False: random backbone weights, nothing is downloaded
    split_file: Path | None = None  # CSV whose cub_split column defines train/val
    views: int = 8  # frozen backbones: cached augmented views of each train photo
    boxes: Path | None = None  # bird-box CSV; None: DATA/annotations.csv when present
    use_boxes: bool = True
    pseudo_labels: Path | None = None  # a trained set: its confident answers on DATA/test_images become train photos
    pseudo_threshold: float = 0.6  # the ensemble probability a pseudo-labelled photo needs
    # Optimisation.
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None  # the head's; pretrained layers learn at lr * backbone_lr_scale
    backbone_lr_scale: float | None = None
    weight_decay: float = 0.05
    label_smoothing: float = 0.1  # train loss only; val and test loss are plain cross-entropy
    mixup: float = 0.0  # Beta(mixup, mixup) weights for mixing train batches; 0: off
    seed: int = 0
    # Lightning Trainer.
    accelerator: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # None: bf16-mixed on a GPU that has it, else 32-true
    logger: str = "csv"
    workers: int = 2
    # Output.
    output: Path = Path("checkpoints")
    resume: bool = False
    force: bool = False  # export even when the existing file's val accuracy is higher
    push_to_hub: str | None = None

    def for_model(self, key: str) -> TrainConfig:
        """This config with the preset's defaults filled in for model `key`. A value given as 0
        also takes the default, as `train.py --epochs 0` always has."""
        defaults = TRAINING_DEFAULTS[self.preset]
        return dataclasses.replace(
            self,
            epochs=self.epochs or default_epochs(self.preset, key),
            lr=self.lr or defaults["lr"],
            backbone_lr_scale=self.backbone_lr_scale or defaults["backbone_lr_scale"],
        )
