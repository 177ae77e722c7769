"""`python -m birdfg.predict --data DIR --checkpoints checkpoints/lite --out kaggle.csv`: one row
`Id,Category` (file stem, class index) per photo, from one model or the ensemble (mean of the
softmaxes). DIR is a dataset folder, whose `test_images/` are predicted (the course's Kaggle
submission file), or any folder of photos, searched at every depth.

Made for folders of any size: photos are decoded a batch at a time by DataLoader workers, rows
are on disk after every batch, a rerun with the same --out predicts only the photos it does not
hold yet, and Lightning's predict loop shares the photos out over --devices and --num-nodes
(DDP: each rank writes its part, rank 0 merges them into --out at the end).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from birdfg import predictions_csv
from birdfg.checkpoints import ModelSet, load_set
from birdfg.data import SPLIT_DIRS, DatasetError, images_under, samples
from birdfg.images import ImageError, open_rgb
from birdfg.inference import Engine
from birdfg.inference.threads import usable_cpus
from birdfg.models import ENSEMBLE_KEY, MODEL_KEYS
from birdfg.predictions_csv import PredictionsFileError

log = logging.getLogger("birdfg.predict")
# Lightning's DDP launcher starts the other ranks by running this command again: say things once.
_info = rank_zero_only(log.info)


# --- which photos -----------------------------------------------------------------------------------


def photo_paths(data: Path) -> list[Path]:
    """The photos to predict, sorted: `DIR/test_images/` of a dataset folder, else every photo
    under DIR."""
    if (data / SPLIT_DIRS["test"]).is_dir():
        return [s.path for s in samples(data, "test", [])]
    if not data.is_dir():
        raise DatasetError(f"{data}: no such folder; pass --data a folder of photos "
                           f"(or a dataset folder with {SPLIT_DIRS['test']}/).")
    return images_under(data)


def check_unique_ids(paths: list[Path]) -> None:
    """A row's Id is its file's stem; two photos with one stem would be one row, and resuming
    would skip the second."""
    first: dict[str, Path] = {}
    clashes = [(first[p.stem], p) for p in paths if first.setdefault(p.stem, p) is not p]
    if clashes:
        shown = "; ".join(f"{a} and {b}" for a, b in clashes[:3])
        raise DatasetError(
            f"{len(clashes)} photo(s) have the same file name (less its extension) as another, e.g. {shown}. "
            "The CSV's Id column is that name, so it must be unique: rename those photos, or predict each "
            "folder into its own --out."
        )


@dataclass
class Scan:
    """A folder's photos against what --out already holds."""

    paths: list[Path]  # every photo, in the order of the merged CSV
    done: dict[str, str]  # Id -> Category written by earlier runs (the file and its parts)
    pending: list[Path]  # the photos still to predict


def scan(data: Path, out: Path) -> Scan:
    """Raises DatasetError or PredictionsFileError with a message for the user."""
    paths = photo_paths(data)
    check_unique_ids(paths)
    done = predictions_csv.collect(out)
    return Scan(paths, done, [p for p in paths if p.stem not in done])


# --- the data: paths in, decoded photos out, a batch at a time ------------------------------------


class PhotoFiles(Dataset):
    """Photos opened one at a time, when the DataLoader asks for them (in its workers): item i is
    (path, photo, None), or (path, None, why it cannot be read)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Path, Image.Image | None, str | None]:
        path = self.paths[index]
        try:
            return path, open_rgb(path), None
        except ImageError as exc:
            return path, None, str(exc)


class PhotoBatch(NamedTuple):
    paths: list[Path]  # of the readable photos, in `photos` order
    photos: list[Image.Image]
    problems: list[str]  # one message per unreadable file of the batch


def collate(items: list[tuple[Path, Image.Image | None, str | None]]) -> PhotoBatch:
    batch = PhotoBatch([], [], [])
    for path, photo, problem in items:
        if photo is None:
            batch.problems.append(problem)
        else:
            batch.paths.append(path)
            batch.photos.append(photo)
    return batch


class PhotoData(L.LightningDataModule):
    """The photos still to predict. Under DDP, Lightning gives each rank every n-th one (its
    predict sampler repeats none)."""

    def __init__(self, pending: list[Path], batch_size: int = 16, workers: int = 2):
        super().__init__()
        self.pending, self.batch_size, self.workers = pending, batch_size, workers

    def setup(self, stage: str) -> None:
        # Every rank must share out the same list. Each made its own at its start, and the files may
        # have changed in between or look otherwise from another node: rank 0's is the one.
        self.pending = self.trainer.strategy.broadcast(self.pending, src=0)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(PhotoFiles(self.pending), batch_size=self.batch_size, num_workers=self.workers,
                          collate_fn=collate)

    def transfer_batch_to_device(self, batch: PhotoBatch, device: torch.device, dataloader_idx: int) -> PhotoBatch:
        return batch  # decoded photos: the engine makes the model inputs and moves them itself


# --- the models ---------------------------------------------------------------------------------------


class EnginePredictor(L.LightningModule):
    """The inference engine as Lightning's predict step: (Id, class index) for each readable photo
    of a batch, from `Engine.run`.

    On a CPU the engine runs its ONNX Runtime sessions, each rank with its share of the machine's
    cores. ONNX Runtime runs on the CPU only here (its CPU execution provider is the one installed),
    so on a GPU the engine runs its torch parts instead: they are this module's submodules, which
    Lightning moves to the rank's device."""

    def __init__(self, model_set: ModelSet, model: str = ENSEMBLE_KEY):
        super().__init__()
        self.model_set, self.model_key = model_set, model
        self.engine: Engine | None = None

    def configure_model(self) -> None:
        if self.engine is not None:
            return
        on_cpu = isinstance(self.trainer.accelerator, CPUAccelerator)
        threads = None
        if on_cpu:  # ranks on one machine would otherwise each start a thread per core
            threads = max(1, usable_cpus() // self.trainer.num_devices)
            torch.set_num_threads(threads)
        self.engine = Engine(self.model_set, runtime="auto" if on_cpu else "torch", warm_up=False, threads=threads)
        self.parts = nn.ModuleList(group.torch_runner.group for group in self.engine.groups)

    def predict_step(self, batch: PhotoBatch) -> list[tuple[str, int]]:
        if not batch.photos:
            return []
        comparisons = self.engine.run(batch.photos)
        failed = {k: r.error for c in comparisons for k, r in c.results.items() if not r.ok}
        if failed:
            raise RuntimeError(f"model(s) failed: {failed}")
        return [(path.stem, c.predicted(self.model_key)) for path, c in zip(batch.paths, comparisons)]


# --- the output -----------------------------------------------------------------------------------------


class RowWriter(BasePredictionWriter):
    """Each rank's rows on disk after every batch: rank 0's in --out, the others' in their part
    files (see predictions_csv). Unreadable photos are logged as they come."""

    def __init__(self, out: Path):
        super().__init__("batch")
        self.out = out
        self.written = self.skipped = 0
        self._appender: predictions_csv.Appender | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not before: opening cuts off a half-written record, and no file may change before every
        # rank has read them (setup, which ends in a barrier).
        rank = trainer.global_rank
        self._appender = predictions_csv.Appender(self.out if rank == 0 else predictions_csv.part_path(self.out, rank))

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: list[tuple[str, int]],
                           batch_indices: Any, batch: PhotoBatch, batch_idx: int, dataloader_idx: int) -> None:
        for message in batch.problems:
            log.warning("skipped %s", message)
        self.skipped += len(batch.problems)
        self._appender.write(prediction)
        self.written += len(prediction)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None


class PhotoProgress(Callback):
    """A progress bar in photos/s, on rank 0. The ranks have equal shares and the same speed, so
    rank 0's count times the number of ranks stands for the whole run's."""

    def __init__(self, total: int):
        self.total = total
        self._bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._bar = tqdm(total=self.total, desc="predicting", unit="photo", dynamic_ncols=True)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                             batch: PhotoBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._bar is not None:
            seen = (len(batch.paths) + len(batch.problems)) * trainer.world_size
            self._bar.update(min(seen, self.total - self._bar.n))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --- the command ----------------------------------------------------------------------------------------


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value  # "2", or Lightning's "auto", "0,1", "-1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m birdfg.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True,
                   help="a folder of photos (any depth), or a dataset folder: its test_images/")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints/lite"))
    p.add_argument("--out", type=Path, default=Path("kaggle.csv"),
                   help="the CSV; photos it already holds are skipped (delete it to start over)")
    p.add_argument("--model", choices=[*MODEL_KEYS, ENSEMBLE_KEY], default=ENSEMBLE_KEY)
    p.add_argument("--batch-size", type=int, default=16, help="photos per batch (a killed run loses at most one)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding photos (0: in the loop)")
    p.add_argument("--accelerator", default="auto", help="Lightning's: cpu, gpu, auto")
    p.add_argument("--devices", type=_devices, default="auto", help="Lightning's: devices per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="Lightning's: e.g. ddp")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    model_set = load_set(args.checkpoints, MODEL_KEYS if args.model == ENSEMBLE_KEY else (args.model,))
    if not model_set.models:
        print(f"error: no usable checkpoint in {args.checkpoints}: " + "; ".join(model_set.errors.values()),
              file=sys.stderr)
        return 2
    try:
        found = scan(args.data, args.out)
    except (DatasetError, PredictionsFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if found.done:
        _info("%s already holds %d of the %d photos: predicting the other %d", args.out,
              len(found.paths) - len(found.pending), len(found.paths), len(found.pending))
    skipped = 0
    if found.pending:
        writer = RowWriter(args.out)
        trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                            strategy=args.strategy, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False,  # PhotoProgress instead
                            callbacks=[writer, PhotoProgress(len(found.pending))])
        trainer.predict(EnginePredictor(model_set, args.model),
                        datamodule=PhotoData(found.pending, args.batch_size, args.workers), return_predictions=False)
        log.info("rank %d of %d: %d photo(s) predicted, %d unreadable", trainer.global_rank, trainer.world_size,
                 writer.written, writer.skipped)
        count = torch.tensor(writer.skipped, device=trainer.strategy.root_device)
        skipped = int(trainer.strategy.reduce(count, reduce_op="sum"))
        trainer.strategy.barrier("merge")  # every rank's rows are on disk
        if not trainer.is_global_zero:
            return 0
    rows = predictions_csv.merge(args.out, [p.stem for p in found.paths])
    print(f"wrote {rows} predictions to {args.out}"
          + (f" ({len(found.done)} of them from earlier runs)" if found.done else "")
          + (f"; skipped {skipped} unreadable file(s)" if skipped else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
