"""Which map of the lite ViT is most faithful? Every candidate beside the app's own three, measured
with the same deletion / insertion test as `python -m birdfg.evaluate --faithfulness`.

    python benchmarks/vit_map_variants.py --checkpoints checkpoints/lite --json benchmarks/results/vit_map_variants_val.json

For the true class of each photo (val_images, or the `test` photos of `--split-file`'s
`cub_split`), maps on the ViT's 10 x 10 token grid, all from the photo's own recorded pass:
- `contributions` (the app's default: the class score split exactly over the tokens with the
  photo's attention held fixed, `TransformerHead.class_maps`), `relevance` (Chefer et al. 2021)
  and `rollout` (Abnar & Zuidema 2020);
- `head_weighted_rollout`: rollout whose heads are weighted, per layer, by their gradient
  importance for the class (sum over the class token's row of (dA * A)+), instead of averaged;
- `grad_cam`: GradCAM (Selvaraju et al. 2017) at the hybrid's last convolutional map, the grid the
  transformer turns into tokens: the class logit's gradient averaged over the grid weights each
  channel, ReLU of the weighted sum; `relevance_x_grad_cam`: the two maps, each scaled to a peak
  of 1, multiplied;
- `token_gradient_x_input`: the gradient of the class logit times each patch token as it enters
  the transformer, summed over channels (first-order share of the logit per token);
- `token_occlusion`: the drop of the class logit when that one token is left out of the sequence;
- `value_norm_rollout`: the last layer's class-token attention weighted by the norm of what each
  token sends (Kobayashi et al. 2020, ||alpha_j f(x_j)||), spread back through the earlier layers'
  rollout; not class-specific;
- `attention_score_cam`: Score-CAM (Wang et al. 2020) whose masks are the ViT's own attention maps
  (each head's class-token row in each layer, and the rollout), each scaled to 0..1: the photo is
  shown through each mask (grey elsewhere) and the masks are summed, weighted by the class's
  probability on what they let through (ReLU); the masks come from the transformer, the weights
  from the model's answers (ViT-CX, Xie et al. 2023, weighs its masks the same way);
- with `--rise N`, `rise`: RISE (Petsiuk, Das & Saenko 2018, the paper of the deletion / insertion
  test itself), a model-agnostic map at the input's resolution: N random binary 7 x 7 grids
  (p = 0.5), upsampled bilinearly with a random shift, each showing the photo with grey elsewhere;
  the map is the masks' mean weighted by the class's probability. N passes of the whole model per
  photo (about 15 s for N = 1000 on 2 cores), so off by default;
- `contributions_from_grey`, `contributions_from_blur`: the token contributions measured from a
  reference photo's tokens instead of from zero (`class_maps(..., reference)`): the deletion
  test's grey photo, or its insertion start (the blurred photo); `contributions_positive`: the contributions' positive
  part; `contributions_smoothed`, `contributions_from_grey_smoothed`: blurred by one token;
- `contributions_of_probability`: the class's log-probability split over the tokens, the class's
  contributions minus every class's weighted by its probability (the gradient of log softmax):
  the deletion test records a probability, which moves only with the class's logit against the
  others', so this map leaves out evidence that raises every bird's logit alike;
- `contributions_stride16`, `contributions_stride8`: the token contributions carried further down,
  through the convolutional stages before the tokens (ReLU6's slopes held fixed too), to the
  trunk's 20 x 20 (`blocks.4`) or 40 x 40 (`blocks.2`) map of the same model, gradient x input
  there; `..._from_grey`: measured from the grey photo's map;
- `relevance_smoothed`, `rollout_smoothed`: the app's maps blurred by a Gaussian of one token
  (sigma 1 cell) -- a diagnosis of where they lose, not a candidate: it says whether the order of
  the maps' weak tail (cells far from the peak) is what the centre prior beats;
- baselines `centre` and `random`, as in birdfg/faithfulness.py.
Per map: mean deletion / insertion AUC and the share of photos on which it beats the centre prior.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import results_file  # benchmarks/results_file.py (this folder is on sys.path when a script runs)

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "bird_dataset"


def _head_tokens(head, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens as they enter the transformer (1, N, D), the whole sequence with the class
    token and positions (1, N + 1, D))."""
    tokens = head.proj(fmap).flatten(2).transpose(1, 2)
    cls = head.cls_token.expand(1, -1, -1)
    return tokens, torch.cat([cls, tokens], dim=1) + head._pos_embed(fmap.shape[-2:])


def _scores(head, sequence: torch.Tensor) -> torch.Tensor:
    return head.fc(head.norm(head.blocks(sequence))[:, 0])


def candidate_maps(head, fmap: torch.Tensor, label: int) -> dict[str, np.ndarray]:
    """Every candidate that reads the head itself, for class `label`, as (side, side) grids."""
    from birdfg.attention import AttentionRecorder
    from birdfg.explanations import rollout_matrix

    fmap = fmap.detach().clone().float().requires_grad_()
    side = fmap.shape[-1]
    grid = lambda row: row.reshape(side, side).detach().float().numpy()  # noqa: E731
    sent: list[torch.Tensor] = []  # each layer's attention input (the values come from it)
    hooks = [b.attn.register_forward_hook(lambda _m, i, _o: sent.append(i[0])) for b in head.blocks]
    recorder = AttentionRecorder(head, keep_graph=True)
    try:
        with torch.enable_grad():
            tokens, sequence = _head_tokens(head, fmap)
            tokens.retain_grad()
            logits = _scores(head, sequence)
            attentions = recorder.take()
            d_attn = torch.autograd.grad(logits[0, label], attentions, retain_graph=True)
            logits[0, label].backward()
    finally:
        recorder.remove()
        for h in hooks:
            h.remove()
    maps: dict[str, np.ndarray] = {}
    attentions = [a.detach()[0].float() for a in attentions]
    fused = []
    for a, g in zip(attentions, d_attn):
        weight = (g[0, :, 0] * a[:, 0]).sum(-1).clamp(min=0)
        weight = weight / weight.sum() if weight.sum() > 0 else torch.full_like(weight, 1 / len(weight))
        fused.append((weight[:, None, None] * a).sum(0))
    maps["head_weighted_rollout"] = grid(rollout_matrix([f[None] for f in fused])[0, 0, 1:])
    weights = fmap.grad[0].mean(dim=(1, 2))  # GradCAM's channel weights at the hybrid's last conv map
    maps["grad_cam"] = grid(torch.relu(torch.einsum("c,chw->hw", weights, fmap.detach()[0])))
    maps["token_gradient_x_input"] = grid((tokens.grad[0] * tokens.detach()[0]).sum(-1))
    with torch.inference_mode():
        n = sequence.shape[1] - 1
        keep = [torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.tensor([j for j in range(n) if j != i])])
                for i in range(n)]
        left_out = _scores(head, sequence.detach()[0][torch.stack(keep)])
        maps["token_occlusion"] = grid(logits.detach()[0, label] - left_out[:, label])
        last = head.blocks[-1].attn
        heads = last.num_heads
        x = sent[-1][0].detach()
        dim = x.shape[-1]
        values = last.qkv(x).reshape(x.shape[0], 3, heads, dim // heads)[:, 2].permute(1, 0, 2)  # (H, N+1, hd)
        through = torch.einsum("hnd,hdo->hno", values, last.proj.weight.reshape(dim, heads, -1).permute(1, 2, 0))
        norms = (attentions[-1][:, 0, :, None] * through).sum(0).norm(dim=-1)  # (N + 1,)
        earlier = (rollout_matrix([a.mean(0)[None] for a in attentions[:-1]])[0] if len(attentions) > 1
                   else torch.eye(n + 1))
        maps["value_norm_rollout"] = grid((norms @ earlier)[1:])
    return maps


def rise_masks(n: int, side: int, cells: int = 7, p: float = 0.5, seed: int = 0) -> torch.Tensor:
    """RISE's masks (n, 1, side, side): binary `cells` x `cells` grids kept with probability `p`,
    upsampled bilinearly to one cell more than the side and cut at a random shift."""
    g = torch.Generator().manual_seed(seed)
    cell = int(np.ceil(side / cells))
    up = (cells + 1) * cell
    grids = (torch.rand(n, 1, cells, cells, generator=g) < p).float()
    big = torch.nn.functional.interpolate(grids, size=(up, up), mode="bilinear", align_corners=False)
    dx, dy = torch.randint(0, cell, (n,), generator=g), torch.randint(0, cell, (n,), generator=g)
    return torch.stack([big[i, :, dy[i]:dy[i] + side, dx[i]:dx[i] + side] for i in range(n)])


def weighted_masks(engine, x: torch.Tensor, label: int, masks: torch.Tensor) -> np.ndarray:
    """The masks (K, 1, H', W') summed, each weighted by the ViT's probability of `label` on the
    photo `x` (1, 3, H, W) seen through it (grey, 0 after normalisation, elsewhere)."""
    shown = torch.nn.functional.interpolate(masks, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    probs = torch.as_tensor(engine.probabilities("vit", x * shown)["vit"][:, label])
    return torch.einsum("k,khw->hw", probs, masks[:, 0]).numpy()


def attention_score_cam(engine, x: torch.Tensor, label: int, attentions: list[torch.Tensor],
                        rollout: np.ndarray) -> np.ndarray:
    side = rollout.shape[0]
    rows = [torch.as_tensor(a)[0, h, 0, 1:].reshape(side, side).float() for a in attentions for h in range(a.shape[1])]
    masks = torch.stack([*rows, torch.as_tensor(rollout, dtype=torch.float32)])[:, None]
    low, high = masks.amin((2, 3), keepdim=True), masks.amax((2, 3), keepdim=True)
    masks = (masks - low) / (high - low).clamp(min=1e-8)
    return np.maximum(weighted_masks(engine, x, label, masks), 0)


def smoothed(grid: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    t = torch.as_tensor(grid, dtype=torch.float32)[None, None]
    return gaussian_blur(t, [5, 5], [sigma, sigma])[0, 0].numpy()


class _LinearisedReLU6(torch.nn.Module):
    """ReLU6 with its slope for this input, relu6(z) / z, held fixed: linear in z."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        slope = torch.where(z.abs() > 1e-6, torch.nn.functional.relu6(z) / z.where(z.abs() > 1e-6, 1.0), 0.0)
        return z * slope.detach()


def linearised_copy(model):
    """A copy of the model whose ReLU6s keep their slopes fixed (`finer_contributions`' model)."""
    import copy

    linear = copy.deepcopy(model).eval()
    for module in list(linear.modules()):
        for child, sub in list(module.named_children()):
            if isinstance(sub, torch.nn.ReLU6):
                setattr(module, child, _LinearisedReLU6())
    return linear


def finer_contributions(linear, x: torch.Tensor, label: int) -> dict[str, np.ndarray]:
    """The token contributions carried further down, through the convolutional stages before the
    tokens, to the trunk's stride-16 (`blocks.4`) and stride-8 (`blocks.2`) maps of `linear`
    (`linearised_copy(model)`): with ReLU6's slopes held fixed too, the class score is linear in
    that map plus biases, and gradient x input splits it over its cells (the trunk is not
    retrained: the same model, a finer split)."""
    trunk = list(linear.backbone)  # conv_stem, bn1, blocks.0 ... blocks.5
    head = linear.head
    out = {}
    for name, cut in (("contributions_stride16", 7), ("contributions_stride8", 5)):  # after blocks.4 / blocks.2
        with torch.inference_mode(False), torch.enable_grad():
            h = x[None].clone()
            with torch.no_grad():
                for m in trunk[:cut]:
                    h = m(h)
            h = h.detach().requires_grad_()
            f = h
            for m in trunk[cut:]:
                f = m(f)
            fmap = linear.top(f)
            score = head._linearised_class_token(head._tokens(fmap)) @ head.fc.weight[label]
            (grad,) = torch.autograd.grad(score.sum(), h)
        out[name] = (grad * h).sum(1)[0].detach().numpy()
        with torch.no_grad():  # measured from the deletion test's grey photo instead of from zero
            grey = torch.zeros_like(x)[None]
            for m in trunk[:cut]:
                grey = m(grey)
        out[name + "_from_grey"] = (grad * (h - grey)).sum(1)[0].detach().numpy()
    return out


def measure(engine, items: list, steps: int, rise: int = 0, only: set[str] | None = None) -> tuple[list[dict], float]:
    from birdfg import faithfulness as fm
    from birdfg.evaluate import photo_seed

    head = engine.models["vit"].model.head
    rows, masks, linear = [], None, None
    began = time.perf_counter()
    for item in tqdm(items, desc="vit maps", unit="photo"):
        photo = Image.open(item.path).convert("RGB")
        comparison = engine.run([photo], evidence=True)[0]
        evidence = comparison.results["vit"].evidence
        maps = {name: engine.explain_all(comparison, "vit", [(item.label, None)], name)[0]
                for name in ("contributions", "relevance", "rollout")}
        maps.update(candidate_maps(head, evidence.features, item.label))
        maps["relevance_smoothed"] = smoothed(maps["relevance"])
        maps["rollout_smoothed"] = smoothed(maps["rollout"])
        unit = lambda m: m / m.max() if m.max() > 0 else m  # noqa: E731
        maps["relevance_x_grad_cam"] = unit(maps["relevance"]) * unit(maps["grad_cam"])
        x = evidence.inputs[0]
        if not only or "attention_score_cam" in only:
            maps["attention_score_cam"] = attention_score_cam(engine, x, item.label, evidence.attentions,
                                                            maps["rollout"])
        if rise:
            if masks is None or masks.shape[-1] != x.shape[-1]:
                masks = rise_masks(rise, x.shape[-1])  # the same masks for every photo
            maps["rise"] = weighted_masks(engine, x, item.label, masks) / (rise * 0.5)
        model = engine.models["vit"].model
        with torch.inference_mode():
            grey = model.features(torch.zeros_like(x)[None])  # deletion's replacement: 0 after normalisation
            soft = model.features(fm.blurred(x)[None])  # insertion's start
        label = torch.tensor([item.label])
        maps["contributions_from_grey"] = head.class_maps(evidence.features, label, grey)[0, 0].numpy()
        maps["contributions_from_blur"] = head.class_maps(evidence.features, label, soft)[0, 0].numpy()
        maps["contributions_positive"] = np.maximum(maps["contributions"], 0)
        # The class's log-probability split over the tokens: its logit's contributions minus every
        # class's, weighted by the class's probability (the gradient of log softmax), i.e. the
        # class rather than the mix of classes the model weighed against it.
        every = engine.explain_all(comparison, "vit", [(c, None) for c in range(len(engine.classes))], "contributions")
        probs = comparison.probs("vit")
        maps["contributions_of_probability"] = every[item.label] - np.tensordot(probs, every, axes=1)
        if not only or any(name.startswith("contributions_stride") for name in only):  # ~0.35 s a photo
            if linear is None:
                linear = linearised_copy(engine.models["vit"].model)
            maps.update(finer_contributions(linear, x, item.label))
        maps["contributions_smoothed"] = smoothed(maps["contributions"])
        maps["contributions_from_grey_smoothed"] = smoothed(maps["contributions_from_grey"])
        maps["centre"] = fm.centre_prior(tuple(x.shape[-2:]))
        maps["random"] = fm.random_map(maps["relevance"].shape, photo_seed(item))
        if only:
            maps = {k: v for k, v in maps.items() if k in only or k in ("centre", "random")}
        plan = fm.plan(x, maps, steps, fm.MODES, seed=photo_seed(item), include_unperturbed=False)
        found = plan.curves(engine.probabilities("vit", plan.inputs)["vit"], comparison.probs("vit"))
        rows.append({"path": item.path.name, **{
            name: [round(fm.auc(plan.fractions, found[(name, mode)][:, item.label]), 5) for mode in fm.MODES]
            for name in maps}})
    return rows, time.perf_counter() - began


def summarise(rows: list[dict]) -> dict:
    names = [k for k in rows[0] if k != "path"]
    centre = np.array([r["centre"] for r in rows])
    out = {}
    for name in names:
        aucs = np.array([r[name] for r in rows])
        out[name] = {"deletion": round(float(aucs[:, 0].mean()), 4), "insertion": round(float(aucs[:, 1].mean()), 4),
                     "beats_centre_deletion": round(float(np.mean(aucs[:, 0] < centre[:, 0])), 4),
                     "beats_centre_insertion": round(float(np.mean(aucs[:, 1] > centre[:, 1])), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "lite")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split-file", type=Path, default=None, help="CUB's split (annotations.csv): its test photos")
    p.add_argument("--limit", type=int, default=None, help="this many evenly spaced photos (default: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rise", type=int, default=0, metavar="N",
                   help="also RISE with N random masks (N passes of the model per photo; default: off)")
    p.add_argument("--maps", default=None,
                   help="comma-separated names: measure only these maps (and the centre and random baselines)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from birdfg.checkpoints import load_set
    from birdfg.data import samples
    from birdfg.evaluate import evenly_spaced
    from birdfg.inference import Engine

    model_set = load_set(args.checkpoints, ("vit",))
    if "vit" not in model_set.models:
        print(f"error: no usable vit checkpoint in {args.checkpoints}: {model_set.errors}", file=sys.stderr)
        return 2
    engine = Engine(model_set)
    if engine.methods["vit"][0].name != "contributions" or not hasattr(engine.models["vit"].model.head, "blocks"):
        print("error: this benchmark reads the lite ViT's own transformer head (TransformerHead)", file=sys.stderr)
        return 2
    # With a split file, birdfg.data's "val" is its cub_split test photos (as in birdfg.evaluate).
    split = "cub_split test" if args.split_file else "val"
    items = evenly_spaced(samples(args.data, "val", engine.classes, args.split_file), args.limit)
    only = set(args.maps.split(",")) if args.maps else None
    rows, seconds = measure(engine, items, args.steps, args.rise, only)
    summary = summarise(rows)
    print(f"\n{len(rows)} photos ({split}), {args.steps} steps, {seconds:.0f} s")
    print(f"{'map':24s} {'deletion':>9s} {'insertion':>9s}  beats centre (del / ins)")
    for name, s in summary.items():
        print(f"{name:24s} {s['deletion']:9.3f} {s['insertion']:9.3f}  "
              f"{s['beats_centre_deletion']:.0%} / {s['beats_centre_insertion']:.0%}")
    if args.json:
        results_file.write(args.json, {
            "command": "python benchmarks/vit_map_variants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "photos": len(rows), "split": split, "steps": args.steps, "seconds": round(seconds, 1),
            "summary": summary, "per_photo": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
