"""Training: the LightningModule (loss, metrics, optimiser) and the Trainer set-up `train.py`
uses. A frozen backbone is run once per image view and cached, and only the head is trained on
the cache; a trainable backbone trains end to end on images. The task does not care which.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from birdfg.checkpoints import CheckpointError
from birdfg.data import Box, ImageDataset, Sample, build_transform, collate, loader
from birdfg.models import BirdModel

log = logging.getLogger(__name__)


class BirdTask(L.LightningModule):
    """Cross-entropy classification of `net` (a whole BirdModel, or only its head when training
    on cached features). AdamW, warm-up + cosine schedule; a trainable backbone learns at
    `backbone_lr_scale` times the head's rate."""

    def __init__(self, net: nn.Module, pretrained: list[nn.Parameter] | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, label_smoothing: float = 0.1, backbone_lr_scale: float = 0.1,
                 warmup_epochs: int = 1):
        super().__init__()
        self.net = net
        self._pretrained_ids = {id(p) for p in pretrained or []}
        self.save_hyperparameters(ignore=["net", "pretrained"])
        self.history: list[dict] = []
        self._counts = {"train": [0, 0], "val": [0, 0]}  # correct, total for the epoch's history row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str):
        if batch is None:  # every image of the batch failed to decode (already reported)
            return None
        x, y, _ = batch
        logits = self(x)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        correct = (logits.argmax(-1) == y).sum()
        self._counts[stage][0] += int(correct)
        self._counts[stage][1] += len(y)
        acc = correct.float() / len(y)
        self.log_dict({f"{stage}_loss": loss, f"{stage}_acc": acc}, prog_bar=True, on_epoch=True,
                      on_step=False, batch_size=len(y), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        self._counts = {"train": [0, 0], "val": [0, 0]}

    def on_train_epoch_end(self) -> None:
        # Validation has run by now (it ends each training epoch), so both counts are complete.
        row = {"epoch": self.current_epoch}
        for stage, (correct, total) in self._counts.items():
            if total:
                row[f"{stage}_acc"] = correct / total
        self.history.append(row)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["birdfg_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("birdfg_history", [])

    def configure_optimizers(self):
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


# --- cached features for frozen backbones ---------------------------------------------------------

class FeatureViews(Dataset):
    """Cached backbone features: (views, N, C, H, W). Each access draws one of the augmented
    views at random, so every epoch sees a different augmentation of each photo."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, i: int):
        view = int(torch.randint(self.features.shape[0], ()))
        return self.features[view, i].float(), int(self.labels[i]), i


@dataclass
class FeatureCache:
    """Backbone features of the train views and the val images, computed once per backbone and
    input size and shared by every head that uses that frozen backbone."""

    train: FeatureViews
    val: FeatureViews
    skipped: list[Path] = field(default_factory=list)


def _cache_key(backbone_name: str, preprocess: dict, views: int, seed: int, train: list[Sample],
               val: list[Sample]) -> str:
    digest = hashlib.sha256(json.dumps([backbone_name, preprocess, views, seed,
                                        [str(s.path) for s in train], [str(s.path) for s in val]]).encode())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def _extract(model: BirdModel, dataset: ImageDataset, batch_size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.empty(0)
    labels = torch.full((len(dataset),), -1, dtype=torch.long)
    dl = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=0)
    for batch in tqdm(dl, desc=desc, unit="batch", leave=False):
        if batch is None:
            continue
        x, y, idx = batch
        out = model.shared_features(x.to(memory_format=torch.channels_last)).to(torch.float16)
        if feats.numel() == 0:
            feats = torch.zeros((len(dataset), *out.shape[1:]), dtype=torch.float16)
        feats[idx] = out
        labels[idx] = y
    return feats, labels


def build_feature_cache(model: BirdModel, preprocess: dict, train: list[Sample], val: list[Sample],
                        views: int, seed: int, cache_dir: Path | None, batch_size: int = 4,
                        boxes: dict[Path, Box] | None = None) -> FeatureCache:
    """Run the frozen backbone over `views` augmented copies of every train photo (view 0 is the
    plain eval transform, the rest random augmentations; with `boxes`, every other one is first
    cropped around the bird, a zoomed view that teaches detail) and over the val photos once.
    With `cache_dir`, the result is kept as safetensors and reused by a resumed run."""
    key = _cache_key(model.spec.backbone + ("+boxes" if boxes else ""), preprocess, views, seed, train, val)
    path = Path(cache_dir) / f"features-{key}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        log.info("reusing cached backbone features %s", path)
        t = load_file(str(path))
        return FeatureCache(FeatureViews(t["train"], t["train_labels"]), FeatureViews(t["val"][None], t["val_labels"]))
    torch.manual_seed(seed)
    model.eval()
    # Depthwise convolutions on a CPU: channels_last and small batches are fastest (measured).
    model.backbone.to(memory_format=torch.channels_last)
    train_views, labels = [], None
    for v in range(views):
        ds = ImageDataset(train, build_transform(preprocess, train=v > 0), boxes if v % 2 == 0 and v > 0 else None)
        feats, labels = _extract(model, ds, batch_size, f"features: train view {v + 1}/{views}")
        train_views.append(feats)
    val_feats, val_labels = _extract(model, ImageDataset(val, build_transform(preprocess, train=False)),
                                     batch_size, "features: val")
    keep_train, keep_val = labels >= 0, val_labels >= 0  # drop photos that failed to decode
    train_t = torch.stack(train_views)[:, keep_train].contiguous()
    val_t = val_feats[keep_val].contiguous()
    cache = FeatureCache(FeatureViews(train_t, labels[keep_train]), FeatureViews(val_t[None], val_labels[keep_val]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"train": train_t, "train_labels": labels[keep_train].contiguous(), "val": val_t,
                   "val_labels": val_labels[keep_val].contiguous()}, str(tmp))
        tmp.replace(path)
    return cache


# --- the Trainer ---------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    backbone_lr_scale: float = 0.1
    seed: int = 0
    accelerator: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    logger: str = "csv"
    workers: int = 2
    resume: bool = False


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


def make_logger(kind: str, save_dir: Path, name: str):
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


def fit(model: BirdModel, train_data, val_data, cfg: TrainConfig, run_dir: Path) -> TrainResult:
    """Train `model` (on images, or its head on cached features when `train_data` is a
    FeatureViews) with Lightning, keeping the best val accuracy; returns its metrics and leaves the
    best weights in `model`."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    on_features = isinstance(train_data, FeatureViews)
    net = model.tail() if on_features else model
    if not on_features:
        model.to(memory_format=torch.channels_last)
    task = BirdTask(net, model.pretrained_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                    backbone_lr_scale=cfg.backbone_lr_scale)
    task.train()  # Lightning keeps each module's mode; feature caching left the model in eval mode
    if on_features:
        train_dl = DataLoader(train_data, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_data) > cfg.batch_size)
        val_dl = DataLoader(val_data, batch_size=256)
    else:
        train_dl, val_dl = train_data, val_data
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val_acc", mode="max",
                                 save_last=True, save_top_k=1, enable_version_counter=False)
    precision = cfg.precision or default_precision(cfg.accelerator)
    trainer = L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, precision=precision, callbacks=[checkpoint],
        logger=make_logger(cfg.logger, run_dir.parent / "logs", run_dir.name), default_root_dir=run_dir,
        log_every_n_steps=5, num_sanity_val_steps=0, enable_model_summary=False, deterministic=False,
    )
    last = run_dir / "last.ckpt"
    ckpt_path = str(last) if cfg.resume and last.exists() else None
    if cfg.resume and ckpt_path is None:
        log.warning("--resume: no %s yet, starting this model from scratch", last)
    start = time.perf_counter()
    if ckpt_path is not None:
        check_resumable(last)
    # weights_only: Lightning checkpoints are pickles; tensors and plain data only, never code.
    trainer.fit(task, train_dl, val_dl, ckpt_path=ckpt_path, weights_only=True)
    seconds = time.perf_counter() - start
    best_path = checkpoint.best_model_path or str(last)
    # This run's own checkpoint, but a pickle all the same: tensors and plain data only.
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    task.load_state_dict(state["state_dict"])
    history = task.history
    best = max(history, key=lambda h: h.get("val_acc", -1)) if history else {}
    return TrainResult(best.get("train_acc", float("nan")), best.get("val_acc", float("nan")),
                       best.get("epoch", -1), trainer.current_epoch, seconds)


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


def image_loaders(train: list[Sample], val: list[Sample], preprocess: dict, cfg: TrainConfig):
    return (loader(train, preprocess, True, cfg.batch_size, cfg.workers, cfg.seed),
            loader(val, preprocess, False, cfg.batch_size, cfg.workers, cfg.seed))
