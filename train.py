"""Train birdfg models: `python train.py --data ../shared/bird_dataset --preset lite`."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from birdfg.models import MODEL_KEYS, PRESETS, TRAINING_DEFAULTS
from birdfg.train_config import TrainConfig

DEFAULT = TrainConfig()  # the one place the defaults live


def _defaults(name: str) -> str:
    def one(preset: str, values: dict) -> str:
        per_model = values.get(f"{name}_of", {})
        extra = "".join(f"; {v} for its {k}" for k, v in per_model.items())
        return f"{values[name]} ({preset}{extra})"

    return ", ".join(one(preset, values) for preset, values in TRAINING_DEFAULTS.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="dataset folder (train_images/, val_images/)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT.preset)
    p.add_argument("--models", nargs="+", choices=sorted({k for preset in PRESETS.values() for k in preset}, key=str),
                   default=list(MODEL_KEYS),
                   help="which models (default: the three; the lite preset also offers bvit, the bilinear ViT)")
    p.add_argument("--epochs", type=int, default=None, help=f"default: {_defaults('epochs')}")
    p.add_argument("--batch-size", type=int, default=DEFAULT.batch_size)
    p.add_argument("--lr", type=float, default=None, help=f"head learning rate; default: {_defaults('lr')}")
    p.add_argument("--backbone-lr-scale", type=float, default=None,
                   help="pretrained (or fine-tuned top) layers learn at lr x this; "
                        f"default: {_defaults('backbone_lr_scale')}")
    p.add_argument("--weight-decay", type=float, default=DEFAULT.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=DEFAULT.label_smoothing,
                   help="label smoothing of the train loss (0: none)")
    p.add_argument("--mixup", type=float, default=DEFAULT.mixup, metavar="ALPHA",
                   help="mix train batches with Beta(ALPHA, ALPHA) weights (cached features: manifold mixup); 0: off")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the preset's)")
    p.add_argument("--backbone", default=None, metavar="TIMM_NAME",
                   help="every model's trunk instead of the preset's (e.g. tf_efficientnet_lite1; README, accuracy levers)")
    p.add_argument("--train-from", default=None, metavar="STAGE",
                   help="frozen-trunk presets: the first backbone stage each model fine-tunes its own copy of "
                        "(default: the preset's, blocks.6 for lite; e.g. blocks.5; README, accuracy levers)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None, metavar="{8,16,32}",
                   help="feature-map trunks: the map's stride (default 32); 16 dilates the last stride-2 stage "
                        "instead, a grid twice as fine (README, \"Are the maps faithful?\")")
    p.add_argument("--seed", type=int, default=DEFAULT.seed)
    p.add_argument("--output", type=Path, default=DEFAULT.output)
    p.add_argument("--split-file", type=Path, default=None,
                   help="CSV such as annotations.csv whose cub_split column (train/test) defines the split")
    p.add_argument("--views", type=int, default=DEFAULT.views,
                   help=f"frozen backbones: augmented views of each train photo to cache (default {DEFAULT.views})")
    p.add_argument("--boxes", type=Path, default=None,
                   help="CSV with bird boxes (annotations.csv format) for zoomed training views; "
                        "default: DATA/annotations.csv when it exists")
    p.add_argument("--no-boxes", action="store_true", help="do not use bird boxes")
    p.add_argument("--pseudo-labels", type=Path, default=None, metavar="TEACHER_SET",
                   help="self-training: add the photos of DATA/test_images (unlabelled) that this trained set's "
                        "ensemble names with probability >= --pseudo-threshold, as train photos of that species")
    p.add_argument("--pseudo-threshold", type=float, default=DEFAULT.pseudo_threshold,
                   help=f"the ensemble probability a pseudo-labelled photo needs (default {DEFAULT.pseudo_threshold})")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights; downloads nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="export even if val accuracy is below the existing file's")
    p.add_argument("--accelerator", default=DEFAULT.accelerator)
    p.add_argument("--devices", default=str(DEFAULT.devices))
    p.add_argument("--num-nodes", type=int, default=DEFAULT.num_nodes)
    p.add_argument("--strategy", default=DEFAULT.strategy)
    p.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU that has it, else 32-true")
    p.add_argument("--logger", default=DEFAULT.logger, choices=["csv", "tensorboard", "wandb", "none"])
    p.add_argument("--workers", type=int, default=DEFAULT.workers)
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="publish the exported set to the Hub")
    args = p.parse_args(argv)
    if not 0.0 <= args.label_smoothing < 1.0:
        p.error(f"--label-smoothing {args.label_smoothing}: must be at least 0 and below 1 (0.1 is the default)")
    if not 0.0 < args.pseudo_threshold <= 1.0:
        p.error(f"--pseudo-threshold {args.pseudo_threshold}: must be above 0 and at most 1 "
                f"(a probability; {DEFAULT.pseudo_threshold} is the default)")
    if args.mixup < 0:
        p.error(f"--mixup {args.mixup}: must be 0 (off) or more (0.2-0.4 is usual)")
    if unknown := [k for k in args.models if k not in PRESETS[args.preset]]:
        p.error(f"--models {' '.join(unknown)}: not in the {args.preset} preset, which has {' '.join(PRESETS[args.preset])}")
    return args


def to_config(args: argparse.Namespace) -> TrainConfig:
    """The parsed flags as the package's TrainConfig (the only place that knows the flag names)."""
    return TrainConfig(
        data=args.data, preset=args.preset, models=tuple(args.models), img_size=args.img_size, backbone=args.backbone,
        train_from=args.train_from, output_stride=args.output_stride,
        pretrained=not args.no_pretrained, split_file=args.split_file, views=args.views,
        boxes=args.boxes, use_boxes=not args.no_boxes, pseudo_labels=args.pseudo_labels,
        pseudo_threshold=args.pseudo_threshold, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        backbone_lr_scale=args.backbone_lr_scale, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, mixup=args.mixup, seed=args.seed,
        accelerator=args.accelerator, devices=int(args.devices) if args.devices.isdigit() else args.devices,
        num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision, logger=args.logger,
        workers=args.workers, output=args.output, resume=args.resume, force=args.force,
        push_to_hub=args.push_to_hub,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    cfg = to_config(parse_args(argv))
    from birdfg.train_set import train_set  # heavy imports after --help

    # The command goes into every exported checkpoint's metadata, as typed.
    return train_set(cfg, "python train.py " + " ".join(shlex.quote(a) for a in argv))


if __name__ == "__main__":
    raise SystemExit(main())
