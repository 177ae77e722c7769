"""What a model trains on, as a Lightning DataModule: photos decoded and augmented on the fly (a
trainable backbone), or the cached features of a frozen backbone (only its top and head train).

A frozen backbone is run once over a few augmented views of every train photo and once over the
val photos (`build_feature_cache`); every model of a set that shares that backbone and input size
trains on the same cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from birdfg.data import Box, ImageDataset, Sample, build_transform, collate
from birdfg.models import BirdModel

log = logging.getLogger(__name__)

# Features are a few KB a photo and the val pass runs in eval mode, where the batch size does not
# change the result: one large batch is simply fastest.
FEATURE_VAL_BATCH = 256


class FeatureViews(Dataset):
    """Cached backbone features: (views, N, C, H, W). Each access draws one of the augmented
    views at random, so every epoch sees a different augmentation of each photo."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
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
    # Labels too: the cache stores them, and the same photos may come back relabelled (--pseudo-labels
    # from another teacher, an edited split file).
    digest = hashlib.sha256(json.dumps([backbone_name, preprocess, views, seed, [(str(s.path), s.label) for s in train],
                                        [(str(s.path), s.label) for s in val]]).encode())
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
    # Depthwise convolutions on a CPU: channels_last and small batches are fastest.
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
        tmp.replace(path)  # a run killed while writing leaves no half cache for --resume to trust
    return cache


class BirdDataModule(L.LightningDataModule):
    """Train and val batches of `(x, label, index)` for one model, from either photos
    (`list[Sample]`: decoded, transformed with `preprocess`, augmented for training) or cached
    backbone features (`FeatureViews`). Both splits must be of the same kind."""

    def __init__(self, train: list[Sample] | FeatureViews, val: list[Sample] | FeatureViews, batch_size: int,
                 preprocess: dict | None = None, workers: int = 0, seed: int = 0):
        super().__init__()
        if isinstance(train, FeatureViews) != isinstance(val, FeatureViews):
            raise TypeError("train and val must both be photos (list[Sample]) or both cached features (FeatureViews).")
        if not isinstance(train, FeatureViews) and preprocess is None:
            raise ValueError("photos need the model's `preprocess` config to be turned into tensors.")
        self.train_source, self.val_source = train, val
        self.batch_size, self.preprocess, self.workers, self.seed = batch_size, preprocess, workers, seed

    @property
    def on_features(self) -> bool:
        return isinstance(self.train_source, FeatureViews)

    def train_dataloader(self) -> DataLoader:
        if self.on_features:
            # Shuffled from the global RNG, which `fit` has seeded; workers are pointless for
            # tensors already in memory. No short last batch (the BatchNorm of a trained top would
            # see only a few photos), unless the whole set is smaller than one batch.
            data = self.train_source
            return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=len(data) > self.batch_size)
        return self._photos(self.train_source, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.on_features:
            return DataLoader(self.val_source, batch_size=FEATURE_VAL_BATCH)
        return self._photos(self.val_source, train=False)

    def _photos(self, items: list[Sample], train: bool) -> DataLoader:
        # Its own seeded generator (shuffle order and the workers' base seed) makes the photo order
        # depend on `seed` alone, not on how much of the global RNG other code has drawn.
        return DataLoader(
            ImageDataset(items, build_transform(self.preprocess, train)),
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.workers,
            collate_fn=collate,  # drops photos that fail to decode
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.workers > 0,  # workers would otherwise restart every epoch
        )
