"""Deploy the app as a Hugging Face Space: `python -m birdfg.space --repo USER/NAME [--dry-run] [--private]`.

A Space runs `pip install -r requirements.txt`, then `python app.py` (README's front matter says so),
so it gets exactly what that needs and nothing else: app.py, birdfg/, one model set
(checkpoints/<set>: its safetensors files and its stored report), examples/, requirements.txt,
README.md and LICENSE when there is one. No tests, benchmarks, graph caches (checkpoints/*/.onnx,
rebuilt at the Space's first start), __pycache__ or results. `space_files` is that list, used by
both the dry run and the upload; `--dry-run` lists and checks it without a token or network.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOP_FILES = ("app.py", "README.md", "requirements.txt", "LICENSE")  # LICENSE only when present
PACKAGE_DIRS = ("birdfg", "examples")
SKIPPED_DIRS = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".pyo")
# The Hub refuses a plain (non-LFS) file over 10 MB; upload_folder sends safetensors files as large
# files (LFS / Xet), which may be far bigger. 10 MB in decimal units, the stricter reading.
PLAIN_FILE_LIMIT = 10 * 1000 * 1000
LARGE_FILE_SUFFIXES = (".safetensors",)
SHORT_DESCRIPTION_MAX = 60  # the Hub's limit for `short_description`
NO_TOKEN = ("no Hugging Face token: run `hf auth login` (huggingface_hub's CLI) or set HF_TOKEN to a token "
            "with write access (https://huggingface.co/settings/tokens), then run this again")


class SpaceError(RuntimeError):
    """The Space cannot be built or uploaded; the message says what to do."""


@dataclass(frozen=True)
class SpaceFile:
    path: str  # relative to the repository root, with "/"
    size: int

    @property
    def large(self) -> bool:
        """Sent as a large file (LFS / Xet), so the plain-file limit does not apply."""
        return self.path.endswith(LARGE_FILE_SUFFIXES)


def default_set(root: Path = ROOT) -> str:
    """The model set the app would serve from `root`/checkpoints (its own rule: full when complete, else lite)."""
    from birdfg.app.sets import discover

    _, default, notes = discover(Path(root) / "checkpoints")
    if default is None:
        raise SpaceError(" ".join(notes) or f"no model set in {root}/checkpoints")
    return default


def space_files(root: Path = ROOT, model_set: str | None = None) -> list[SpaceFile]:
    """Every file the Space needs, sorted by path. `model_set`: the folder name under checkpoints/
    (default: the app's default set)."""
    from birdfg import layout
    from birdfg.checkpoints import find_sets
    from birdfg.models import MODEL_KEYS

    root = Path(root)
    model_set = model_set or default_set(root)
    set_folder = root / "checkpoints" / model_set
    if not layout.holds_models(set_folder):
        raise SpaceError(f"{set_folder} holds no model checkpoint: choose one of {sorted(find_sets(root / 'checkpoints'))} "
                         "with --set, or train one (README, Training)")
    paths = [root / name for name in TOP_FILES if (root / name).is_file()]
    for folder in PACKAGE_DIRS:
        paths += [p for p in (root / folder).rglob("*") if p.is_file() and _wanted(p.relative_to(root))]
    # The set as the layout defines it: no pickles, no graph cache (.onnx/), nothing else left there.
    paths += [layout.checkpoint_path(set_folder, k) for k in MODEL_KEYS if layout.checkpoint_path(set_folder, k).is_file()]
    report = layout.report_dir(set_folder)
    if report.is_dir():
        paths += [p for p in report.rglob("*") if p.is_file() and _wanted(p.relative_to(root))]
    return sorted((SpaceFile(p.relative_to(root).as_posix(), p.stat().st_size) for p in paths), key=lambda f: f.path)


def _wanted(relative: Path) -> bool:
    return not any(part in SKIPPED_DIRS or part.startswith(".") for part in relative.parts) \
        and relative.suffix not in SKIPPED_SUFFIXES


def front_matter(readme: Path) -> dict[str, Any]:
    """README's YAML front matter ({} without one)."""
    from huggingface_hub import metadata_load

    return metadata_load(readme) or {}


def gradio_pin(requirements: Path) -> str | None:
    """The version that requirements.txt pins gradio to (`gradio==X` or `gradio[extra]==X`)."""
    match = re.search(r"^gradio(?:\[[^\]]*\])?==(\S+)", Path(requirements).read_text(), re.MULTILINE)
    return match.group(1) if match else None


def check(files: list[SpaceFile], root: Path = ROOT) -> list[str]:
    """What would stop the Space from uploading or starting, each with what to do ([] when ready)."""
    root = Path(root)
    problems = [f"{f.path} is {f.size / 1e6:.1f} MB: the Hub takes plain files up to {PLAIN_FILE_LIMIT / 1e6:.0f} MB; "
                "make it smaller or leave it out of the Space" for f in files if not f.large and f.size > PLAIN_FILE_LIMIT]
    paths = {f.path for f in files}
    missing = [name for name in ("app.py", "README.md", "requirements.txt") if name not in paths]
    if missing:
        return problems + [f"missing {', '.join(missing)} in {root}: the Space cannot start without them"]
    if not any(f.path.startswith("checkpoints/") and f.large for f in files):
        problems.append("no model checkpoint in the list: train a set (README, Training) or choose one with --set")
    meta = front_matter(root / "README.md")
    pin = gradio_pin(root / "requirements.txt")
    if meta.get("sdk") != "gradio":
        problems.append("README.md's front matter must say `sdk: gradio`")
    if str(meta.get("sdk_version")) != str(pin):
        problems.append(f"README.md's sdk_version ({meta.get('sdk_version')}) differs from requirements.txt's gradio "
                        f"pin ({pin}): the Space would run another gradio; make them equal")
    if meta.get("app_file", "app.py") not in paths:
        problems.append(f"README.md's app_file ({meta.get('app_file')}) is not among the Space's files")
    if len(str(meta.get("short_description", ""))) > SHORT_DESCRIPTION_MAX:
        problems.append(f"README.md's short_description is longer than {SHORT_DESCRIPTION_MAX} characters: shorten it")
    problems += _uncredited_examples(files, root)
    return problems


def _uncredited_examples(files: list[SpaceFile], root: Path) -> list[str]:
    """A photo in examples/ without its row in CREDITS.csv would be shown without the credit its
    licence asks for (or is not ours to publish, e.g. a CUB photo)."""
    from birdfg.app.examples import read_credits
    from birdfg.data import IMAGE_SUFFIXES

    credited = read_credits(root / "examples")
    return [f"{f.path} has no row in examples/CREDITS.csv: add its author, licence, source and changes, or remove it"
            for f in files if f.path.startswith("examples/") and Path(f.path).suffix.lower() in IMAGE_SUFFIXES
            and Path(f.path).name not in credited]


def stage(files: list[SpaceFile], dest: Path, root: Path = ROOT) -> Path:
    """Copy the Space's files into `dest` (the folder that is uploaded, or tried as a Space)."""
    for f in files:
        target = Path(dest) / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(root) / f.path, target)
    return Path(dest)


def describe(files: list[SpaceFile]) -> str:
    """The dry run's listing: each file and its size, then the total."""
    lines = [f"{_size(f.size):>10}  {f.path}{'  (large file)' if f.large else ''}" for f in files]
    plain = [f for f in files if not f.large]
    largest = max(plain, key=lambda f: f.size, default=None)
    lines.append(f"{len(files)} files, {_size(sum(f.size for f in files))} in all"
                 + (f"; largest plain file {largest.path} ({_size(largest.size)}, limit "
                    f"{_size(PLAIN_FILE_LIMIT)})" if largest else ""))
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def deploy(repo_id: str, files: list[SpaceFile], root: Path = ROOT, private: bool = False,
           api: Any = None) -> str:
    """Create the Space (or keep it) and make its files exactly `files`; returns its URL.
    Files of the Space that are not in the list are deleted (the Hub keeps its .gitattributes)."""
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if api is None:
        if not get_token():
            raise SpaceError(NO_TOKEN)
        api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        repo_id = getattr(url, "repo_id", repo_id)  # "name" alone means the token owner's namespace
        with tempfile.TemporaryDirectory(prefix="birdfg-space-") as tmp:
            api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(stage(files, Path(tmp), root)),
                              commit_message="Deploy birdfg", delete_patterns="*")
    except OfflineModeIsEnabled as exc:
        raise SpaceError("HF_HUB_OFFLINE is set: unset it to upload") from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        hint = {401: "the token was refused: log in again (`hf auth login`) or set another HF_TOKEN",
                403: f"the token may not write to {repo_id.split('/')[0]!r}: use a token with write access there"}
        raise SpaceError(f"the Hub refused ({exc}); {hint.get(status, 'check the repo id and your access')}") from exc
    except (httpx.TransportError, OSError) as exc:  # huggingface_hub talks through httpx
        raise SpaceError(f"could not reach the Hub ({exc}); check the network and run this again") from exc
    return f"https://huggingface.co/spaces/{repo_id}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m birdfg.space", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, metavar="ID", help="the Space, e.g. your-name/birdfg")
    p.add_argument("--dry-run", action="store_true", help="list and check the files; upload nothing")
    p.add_argument("--private", action="store_true", help="create the Space private (an existing one keeps its setting)")
    p.add_argument("--set", dest="model_set", default=None, metavar="NAME",
                   help="the model set under checkpoints/ (default: the app's default, full when complete, else lite)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = space_files(ROOT, args.model_set)
        print(describe(files))
        problems = check(files, ROOT)
        if problems:
            print("\nNot ready for a Space:\n" + "\n".join(f"- {p}" for p in problems), file=sys.stderr)
            return 1
        if args.dry_run:
            print(f"\nReady: `python -m birdfg.space --repo {args.repo}` uploads these files.")
            return 0
        print(f"\nSpace: {deploy(args.repo, files, ROOT, args.private)}")
        return 0
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
