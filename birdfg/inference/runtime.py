"""Where a part runs: ONNX Runtime (the default on a CPU) or torch eager (the fallback, and the
reference the ONNX graphs are checked against).

An exported graph is cached under the set folder's `.onnx/` (or the user's cache when that is
not writable), named by a sha256 over the group's structure and weights (the checkpoints' tensors and the
frozen trunk's), its input shape and the exporter's versions; a cached file whose embedded key differs
is refused and rebuilt. ONNX files are protobuf, never pickles.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from birdfg.inference.parts import GroupPart, Outputs
from birdfg.inference.threads import usable_cpus

log = logging.getLogger("birdfg.inference")

GRAPH_FORMAT = "birdfg-graph/2"  # bump when the parts' outputs or their export change: old cache files go stale
OPSET = 17
USER_CACHE = Path(os.environ.get("BIRDFG_CACHE", Path.home() / ".cache" / "birdfg")) / "onnx"

def graph_source(module: nn.Module) -> str:
    """A digest of what a module's graph depends on: its structure and its weights and buffers
    (names, dtypes, shapes and values), i.e. the checkpoints it was loaded from, the frozen trunk
    from the registry, and anything replaced in memory."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update((t.float() if t.dtype == torch.bfloat16 else t).numpy())  # no copy for other dtypes
    return digest.hexdigest()


def graph_key(name: str, source: str, example: torch.Tensor) -> str:
    fields = {"format": GRAPH_FORMAT, "part": name, "source": source, "input": list(example.shape[1:]),
              "torch": torch.__version__, "opset": OPSET}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class TorchRunner:
    """A group in torch eager, under inference_mode, each model on its own: a model that fails
    gives its exception and the others still answer. It runs on the device its group's weights
    are on (moving the group, e.g. to a GPU, moves the runner) and answers in CPU tensors."""

    runtime = "torch"

    def __init__(self, group: GroupPart):
        self.group = group

    @property
    def device(self) -> torch.device:
        return next(self.group.parameters()).device

    def __call__(self, x: torch.Tensor, evidence: bool) -> dict[str, Outputs | Exception]:
        device = self.device
        done = self._run(x.to(device), evidence)
        if device.type == "cpu":
            return done
        # Results become numpy arrays and explanation maps, on the host.
        return {key: out if isinstance(out, Exception) else {name: t.cpu() for name, t in out.items()}
                for key, out in done.items()}

    def _run(self, x: torch.Tensor, evidence: bool) -> dict[str, Outputs | Exception]:
        self.group.keep_attention(evidence)  # fused attention when no map is wanted
        with torch.inference_mode():
            try:
                shared = self.group.trunk.forward_features(x) if self.group.trunk is not None else x
            except Exception as exc:  # noqa: BLE001 - reported for every model of the group
                return {key: exc for key in self.group.parts}
            done: dict[str, Outputs | Exception] = {}
            for key, part in self.group.parts.items():
                try:
                    done[key] = part(shared)
                except Exception as exc:  # noqa: BLE001 - one failing model must not take the others down
                    done[key] = exc
                    continue
                if self.group.trunk is not None:
                    done[key]["shared"] = shared
        return done


class OnnxRunner:
    """A group as one ONNX Runtime session (CPU execution provider)."""

    runtime = "onnx"

    def __init__(self, session):
        self.session = session
        self.output_names = [output.name for output in session.get_outputs()]
        self.without_attention = [n for n in self.output_names if ".attention." not in n]

    def __call__(self, x: torch.Tensor, evidence: bool) -> dict[str, Outputs | Exception]:
        names = self.output_names if evidence else self.without_attention
        outputs = dict(zip(names, self.session.run(names, {"x": np.ascontiguousarray(x.numpy())})))
        done: dict[str, Outputs] = {}
        for name, value in outputs.items():
            key, _, output = name.partition(".")
            if name != "shared":
                done.setdefault(key, {})[output] = torch.from_numpy(value)
        if "shared" in outputs:
            for out in done.values():
                out["shared"] = torch.from_numpy(outputs["shared"])
        return done


class _Flat(nn.Module):
    """A group's outputs as the tuple the ONNX exporter takes, in `names` order."""

    def __init__(self, group: GroupPart, names: tuple[str, ...]):
        super().__init__()
        self.group, self.names = group, names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.group(x)
        return tuple(out[n] for n in self.names)


def onnx_available() -> bool:
    """Whether ONNX Runtime and the exporter's `onnx` are installed (found, not imported: onnx
    loads only when a graph has to be exported)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    # ENABLE_ALL adds the layout transforms (NCHWc convolutions) that make ORT pay on this CPU.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spinning: a spinning thread takes a core from the map
    # drawing that follows on the calling thread (benchmarks/README.md, the A/B table).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnx_runner(part: GroupPart, name: str, example: torch.Tensor, folder: Path | None,
                threads: int | None = None) -> OnnxRunner:
    """The part's cached graph as a session (`threads` intra-op threads, default one per usable
    CPU), exported first when there is no valid one."""
    key = graph_key(name, graph_source(part), example)
    for cache in _cache_dirs(folder):
        path = cache / f"{name}-{key[:16]}.onnx"
        if path.is_file():
            session = _open(path, key, threads)
            if session is not None:
                return OnnxRunner(session)
        try:
            _export(part, example, key, path)
        except OSError as exc:  # a read-only set folder (e.g. the Hub cache): try the next place
            log.info("cannot write %s (%s)", path, exc)
            continue
        return OnnxRunner(_session(str(path), threads))
    with tempfile.TemporaryDirectory() as tmp:  # nowhere to keep it: build it for this process only
        path = Path(tmp) / "part.onnx"
        _export(part, example, key, path)
        return OnnxRunner(_session(path.read_bytes(), threads))


def _cache_dirs(folder: Path | None) -> list[Path]:
    from birdfg.layout import graph_cache_dir

    return ([graph_cache_dir(folder)] if folder is not None else []) + [USER_CACHE]


def _session(graph: str | bytes, threads: int | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(graph, session_options(threads), providers=["CPUExecutionProvider"])


def _open(path: Path, key: str, threads: int | None = None):
    """A session of a cached graph, or None when the file is not the graph for `key`."""
    try:
        session = _session(str(path), threads)
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
        log.warning("%s is not a readable graph (%s); rebuilding it", path, exc)
        return None
    if session.get_modelmeta().custom_metadata_map.get("birdfg_key") != key:
        log.warning("%s was built for other weights or versions; rebuilding it", path)
        return None
    return session


def _export(part: GroupPart, example: torch.Tensor, key: str, path: Path) -> None:
    """Export `part` with a dynamic batch axis to `path` atomically, the key embedded. Attention
    is always recorded: the graph holds it, and a run that needs no map does not fetch it."""
    import onnx

    part.keep_attention(True)
    with torch.inference_mode():
        names = tuple(part(example))  # the output names, in the order the exporter takes them

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad(), fixed_same_padding():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side constants
            torch.onnx.export(_Flat(part, names).eval(), (example,), tmp, dynamo=False, input_names=["x"], output_names=list(names),
                              dynamic_axes={n: {0: "batch"} for n in ("x", *names)}, opset_version=OPSET)
        graph = onnx.load(tmp)
        graph.metadata_props.add(key="birdfg_key", value=key)
        onnx.save(graph, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# timm's modules that pad TF-style ("same") at run time, each calling its own `pad_same`.
_SAME_PADDING_MODULES = ("timm.layers.conv2d_same", "timm.layers.pool2d_same")


@contextlib.contextmanager
def fixed_same_padding():
    """While exporting, TF-style "same" padding (timm's `tf_*` trunks, such as EfficientNet-Lite)
    is a constant of the example's size. Traced as timm writes it, each strided convolution's
    padding is computed from the tensor's shape at run time: the graph then holds that arithmetic
    and a Pad of its own before each such convolution, which ONNX Runtime can neither fold nor merge
    into the convolution, so the NCHWc layout leaves and re-enters around every one of them. A
    graph serves one input size (its key holds it; only the batch axis is dynamic), so its padding
    is fixed: the same numbers, merged into the convolutions (benchmarks/README.md, "Engine A/B")."""
    from timm.layers.padding import get_same_padding

    def pad_same(x: torch.Tensor, kernel_size, stride, dilation=(1, 1), value: float = 0) -> torch.Tensor:
        ih, iw = (int(side) for side in x.shape[-2:])  # Python ints: constants in the trace
        pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
        pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)

    # `timm.layers.conv2d_same` as an attribute is the function of that name: import the modules.
    modules = [importlib.import_module(name) for name in _SAME_PADDING_MODULES]
    traced = [module.pad_same for module in modules]
    for module in modules:
        module.pad_same = pad_same
    try:
        yield
    finally:
        for module, original in zip(modules, traced):
            module.pad_same = original


def runner(part: GroupPart, name: str, example: torch.Tensor, folder: Path | None, runtime: str,
           torch_runner: TorchRunner, threads: int | None = None) -> TorchRunner | OnnxRunner:
    """Where the group runs: ONNX Runtime for "onnx", and for "auto" when it is installed (with
    `threads` per session); `torch_runner` for "torch", and for a group that cannot be exported
    (with a warning)."""
    if runtime not in ("auto", "onnx", "torch"):
        raise ValueError(f"Unknown runtime {runtime!r}; choose auto, onnx or torch.")
    if runtime == "torch" or (runtime == "auto" and not onnx_available()):
        return torch_runner
    try:
        return onnx_runner(part, name, example, folder, threads)
    except Exception as exc:  # noqa: BLE001 - an unexportable part still answers, in torch
        if runtime == "onnx":
            raise
        log.warning("%s runs in torch: its ONNX export failed (%s: %s)", name, type(exc).__name__, exc)
        return torch_runner
