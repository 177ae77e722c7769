"""Training one model: the LightningModule (loss, optimiser, steps), the callback that keeps each
epoch's accuracies, and `fit`, which sets up the Trainer and its checkpoints.

A frozen backbone trains only its top and head, on cached features; a trainable backbone trains
end to end on photos. `BirdDataModule` hides which; the task itself does not care.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from birdfg.checkpoints import CheckpointError
from birdfg.data import Sample
from birdfg.datamodule import BirdDataModule, FeatureViews
from birdfg.models import BirdModel, preprocess_config
from birdfg.train_config import TrainConfig

# FeatureViews and TrainConfig too: what a caller needs to train one model comes from here.
__all__ = ["BirdTask", "EpochHistory", "FeatureViews", "TrainConfig", "TrainResult", "check_resumable",
           "default_precision", "fit", "make_logger"]

log = logging.getLogger(__name__)

STAGES = ("train", "val")


class ExactAccuracy(MulticlassAccuracy):
    """Micro-averaged accuracy, returned as the exact fraction correct / total in float64.

    MulticlassAccuracy divides in float32, so 5/6 comes out as 0.83333331 where the checkpoints
    already on disk store 0.8333333333333334: a retrained model with the same accuracy would then
    lose `train_set`'s "keep the better file" comparison. The counts are MulticlassAccuracy's own,
    summed over all ranks before `compute`."""

    def compute(self) -> torch.Tensor:
        tp, _, _, fn = self._final_state()
        correct, total = int(tp.sum()), int((tp + fn).sum())
        # On the CPU: some accelerators (MPS) have no float64.
        return torch.tensor(correct / total if total else 0.0, dtype=torch.float64)


class BirdTask(L.LightningModule):
    """Cross-entropy classification of `net` (a whole BirdModel, or only its top and head when
    training on cached features). AdamW, warm-up + cosine schedule; the `pretrained` parameters
    learn at `backbone_lr_scale` times the head's rate. Logs `train_loss`, `train_acc`,
    `val_loss`, `val_acc` per epoch, synchronised across ranks."""

    def __init__(self, net: nn.Module, pretrained: list[nn.Parameter] | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, label_smoothing: float = 0.1, backbone_lr_scale: float = 0.1,
                 warmup_epochs: int = 1, num_classes: int | None = None, mixup: float = 0.0):
        super().__init__()
        self.net = net
        self._pretrained_ids = {id(p) for p in pretrained or []}
        # num_classes is the net's, not a training setting (and run checkpoints keep their hparams).
        self.save_hyperparameters(ignore=["net", "pretrained", "num_classes"])
        if num_classes is None:
            num_classes = net.spec.num_classes  # a whole BirdModel knows its own
        # Metric objects, not per-batch values: Lightning computes them once per epoch from the
        # counts of every rank (a rank alone sees only its shard of the data under DDP).
        # validate_args=False: labels come from our own datasets, and the checks cost a device
        # sync per step.
        self.accuracy = nn.ModuleDict({
            f"{stage}_acc": ExactAccuracy(num_classes, average="micro", validate_args=False) for stage in STAGES
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, stage: str) -> torch.Tensor | None:
        if batch is None:  # every image of the batch failed to decode (already reported)
            return None
        x, y, _ = batch
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        if stage == "train" and self.hparams.mixup > 0 and len(y) > 1:
            loss, logits = self._mixup_loss(x, y, smoothing)
        else:
            logits = self(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy.update(logits.detach().argmax(-1), y)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=len(y),
                 sync_dist=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def _mixup_loss(self, x: torch.Tensor, y: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup (Zhang et al. 2018) of the batch with a shuffled copy of itself, weight
        lam ~ Beta(mixup, mixup). On cached features it mixes the trunk's output maps (manifold
        mixup), on photos the pixels. lam is kept >= 0.5, so `y` stays the label that train_acc
        counts."""
        alpha = torch.tensor(float(self.hparams.mixup))
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
        lam = max(lam, 1.0 - lam)
        perm = torch.randperm(len(y), device=y.device)
        logits = self(lam * x + (1.0 - lam) * x[perm])
        scores = logits.float()
        loss = (lam * F.cross_entropy(scores, y, label_smoothing=smoothing)
                + (1.0 - lam) * F.cross_entropy(scores, y[perm], label_smoothing=smoothing))
        return loss, logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> dict:
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in self._pretrained_ids], "lr": self.hparams.lr},
            {"params": [p for p in trainable if id(p) in self._pretrained_ids],
             "lr": self.hparams.lr * self.hparams.backbone_lr_scale},
        ]
        optimiser = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.hparams.weight_decay)
        total = max(self.trainer.estimated_stepping_batches, 1)
        warmup = min(total // 2, self.hparams.warmup_epochs * max(total // max(self.trainer.max_epochs, 1), 1))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class EpochHistory(L.Callback):
    """One row per epoch, `{"epoch", "train_acc", "val_acc"}`, from the task's logged metrics: what
    `fit` reports for the best epoch. Kept in the run checkpoints under "birdfg_history", so a
    resumed run still knows the epochs before the interruption."""

    CHECKPOINT_KEY = "birdfg_history"

    def __init__(self) -> None:
        self.history: list[dict[str, float | int]] = []
        self._val_acc: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_acc = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Read here rather than at the train epoch's end, where an epoch without validation would
        # still show the previous one's value.
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self._val_acc = float(trainer.callback_metrics["val_acc"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the checkpoint callbacks of this epoch (Lightning calls those last), so the
        # epoch's last.ckpt holds its own row.
        row: dict[str, float | int] = {"epoch": trainer.current_epoch}
        if "train_acc" in trainer.callback_metrics:
            row["train_acc"] = float(trainer.callback_metrics["train_acc"])
        if self._val_acc is not None:
            row["val_acc"] = self._val_acc
        self.history.append(row)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.CHECKPOINT_KEY] = self.history

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.history = list(checkpoint.get(self.CHECKPOINT_KEY, []))

    def best(self) -> dict[str, float | int]:
        """The row with the highest val accuracy (the first of equals, as ModelCheckpoint keeps)."""
        return max(self.history, key=lambda h: h.get("val_acc", -1)) if self.history else {}


@dataclass
class TrainResult:
    train_acc: float
    val_acc: float
    best_epoch: int
    epochs_run: int
    seconds: float


def default_precision(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def make_logger(kind: str, save_dir: Path, name: str) -> L.pytorch.loggers.Logger | bool:
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir, name=name)
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise SystemExit("--logger tensorboard needs `pip install tensorboard`; or use --logger csv.") from exc
        return L.pytorch.loggers.TensorBoardLogger(save_dir, name=name)
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise SystemExit("--logger wandb needs `pip install wandb`; or use --logger csv/tensorboard.") from exc
        return L.pytorch.loggers.WandbLogger(save_dir=str(save_dir), name=name)
    if kind == "none":
        return False
    raise SystemExit(f"Unknown --logger {kind!r}: use csv, tensorboard, wandb or none.")


def fit(model: BirdModel, train: list[Sample] | FeatureViews, val: list[Sample] | FeatureViews,
        cfg: TrainConfig, run_dir: Path) -> TrainResult:
    """Train `model` on photos, or its top and head on cached features (FeatureViews), keeping the
    best val accuracy; returns that epoch's metrics and leaves the best weights in `model`.
    `run_dir` holds best.ckpt and last.ckpt (every epoch's end, for `cfg.resume`)."""
    cfg = cfg.for_model(model.spec.key)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = BirdDataModule(train, val, cfg.batch_size, preprocess_config(model.spec), cfg.workers, cfg.seed)
    net = model.tail() if data.on_features else model
    if not data.on_features:
        model.to(memory_format=torch.channels_last)
    task = BirdTask(net, model.pretrained_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                    label_smoothing=cfg.label_smoothing, mixup=cfg.mixup,
                    backbone_lr_scale=cfg.backbone_lr_scale, num_classes=model.spec.num_classes)
    task.train()  # Lightning keeps each module's mode; feature caching left the model in eval mode
    run_dir.mkdir(parents=True, exist_ok=True)
    best = ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val_acc", mode="max", save_top_k=1,
                           enable_version_counter=False)
    # A checkpoint of its own for last.ckpt: ModelCheckpoint(save_last=True) writes it only in
    # epochs where the monitored metric improved (Lightning >= 2.6), so --resume would restart
    # from the best epoch rather than the last one.
    last = ModelCheckpoint(dirpath=run_dir, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    history = EpochHistory()
    trainer = L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, precision=cfg.precision or default_precision(cfg.accelerator),
        callbacks=[history, best, last], logger=make_logger(cfg.logger, run_dir.parent / "logs", run_dir.name),
        default_root_dir=run_dir, log_every_n_steps=5, num_sanity_val_steps=0, enable_model_summary=False,
        deterministic=False,
    )
    last_path = run_dir / "last.ckpt"
    ckpt_path = str(last_path) if cfg.resume and last_path.exists() else None
    if cfg.resume and ckpt_path is None:
        log.warning("--resume: no %s yet, starting this model from scratch", last_path)
    start = time.perf_counter()
    if ckpt_path is not None:
        check_resumable(last_path)
    # weights_only: Lightning checkpoints are pickles; tensors and plain data only, never code.
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    seconds = time.perf_counter() - start
    best_path = best.best_model_path or str(last_path)
    # This run's own checkpoint, but a pickle all the same: tensors and plain data only.
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    task.load_state_dict(state["state_dict"])
    row = history.best()
    return TrainResult(row.get("train_acc", float("nan")), row.get("val_acc", float("nan")),
                       row.get("epoch", -1), trainer.current_epoch, seconds)


def check_resumable(path: Path) -> None:
    """`--resume` reads a run folder's last.ckpt, which may be a file this run never wrote (copied
    in, planted, or cut short by a full disk). Lightning checkpoints are pickles, so it is read
    with weights_only=True (tensors and plain data, never code); a file that fails that is
    refused with what to do, before any training starts."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError (foreign objects), RuntimeError (damaged zip), ...
        raise CheckpointError(
            f"{path}: cannot resume from it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "It is not a checkpoint a birdfg run wrote, or it is damaged: delete it, or run without --resume."
        ) from exc
