"""The explanations on tiny hand-built models, where the right answer is known: CAM and the
bilinear decomposition are exact sums of the class score (and their contrasts of the logit
difference), rollout follows the attention it is given, the gradient-weighted relevance finds
the token a class depends on, and the overlay puts a map where the model looked."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import Block

from birdfg.attention import AttentionRecorder
from birdfg.explanations import (AttentionRelevance, AttentionRollout, BilinearSplit, ClassActivationMap, Evidence,
                                 LayerAttention, TokenContributions, attention_rollout, class_token_attention,
                                 explanations_of, gradient_relevance)
from birdfg.heads import BilinearHead, BilinearTransformerHead, LinearHead, TransformerHead
from birdfg.overlay import crop_box, normalise, overlay, peak_location

torch.manual_seed(0)


def planted_fmap(channels: int = 8, size: int = 7, at: tuple[int, int] = (5, 2), channel: int = 3) -> torch.Tensor:
    """Weak noise everywhere, one strong feature (channel `channel`) at location `at`."""
    fmap = 0.01 * torch.rand(1, channels, size, size)
    fmap[0, channel, at[0], at[1]] = 5.0
    return fmap


def argmax2d(heat) -> tuple[int, int]:
    heat = np.asarray(heat)
    return tuple(int(v) for v in np.unravel_index(np.argmax(heat), heat.shape))


# --- CNN: class activation map ----------------------------------------------------------------


def test_cam_peaks_where_the_planted_feature_is():
    head = LinearHead(8, 3).eval()
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[1, 3] = 1.0  # class 1 looks for channel 3
    heat = ClassActivationMap(_Model(head)).grid(Evidence(planted_fmap(at=(5, 2))), 1)
    assert heat.shape == (7, 7) and argmax2d(heat) == (5, 2)


def test_cam_averages_to_the_logit_minus_bias():
    head = LinearHead(16, 5).eval()
    fmap = torch.randn(2, 16, 4, 6)
    logits = head(fmap)
    maps = head.class_maps(fmap, torch.arange(5))
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + head.fc.bias, logits)


def test_contrastive_cam_sums_to_the_logit_difference():
    head = LinearHead(16, 5).eval()
    fmap = torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        logits = head(fmap)[0] - head.fc.bias
    contrast = ClassActivationMap(_Model(head)).grid(Evidence(fmap), 1, rather=3)
    assert contrast.mean() == pytest.approx(float(logits[1] - logits[3]), rel=1e-5, abs=1e-6)


# --- B-CNN: bilinear score decomposed over locations ------------------------------------------


@pytest.mark.parametrize("dim", [None, 6])
def test_bilinear_maps_sum_to_the_class_score_minus_bias(dim):
    head = BilinearHead(8, 4, dim=dim).eval()
    fmap = torch.rand(2, 8, 5, 5)
    with torch.no_grad():
        logits = head(fmap)
        maps = head.class_maps(fmap, torch.arange(4))
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + head.fc.bias, logits, rtol=1e-4, atol=1e-5)


def test_contrastive_bilinear_map_sums_to_the_logit_difference():
    head = BilinearHead(8, 4, dim=6).eval()
    fmap = torch.rand(1, 8, 5, 5)
    with torch.no_grad():
        logits = head(fmap)[0] - head.fc.bias
    method = BilinearSplit(_Model(head))
    contrast = method.grid(Evidence(fmap), 2, rather=0)
    assert contrast.sum() == pytest.approx(float(logits[2] - logits[0]), rel=1e-4, abs=1e-5)
    both = method.grids(Evidence(fmap), [(2, 0), (2, None), (0, None)])
    np.testing.assert_allclose(both[0], both[1] - both[2], rtol=1e-5, atol=1e-6)


def test_bilinear_transformer_maps_sum_to_the_class_score_over_its_tokens():
    """The bilinear ViT (the report's "B-CNN extended with transformers"): the location split over
    its encoder's output tokens is exact too, and a contrast is the logit difference."""
    head = BilinearTransformerHead(8, 4, grid=5, dim=16, depth=2, heads=2, bilinear_dim=6).eval()
    fmap = torch.rand(2, 8, 5, 5)
    with torch.no_grad():
        logits = head(fmap)
        maps = head.class_maps(fmap, torch.arange(4))
    torch.testing.assert_close(maps.sum(dim=(2, 3)) + head.bilinear.fc.bias, logits, rtol=1e-4, atol=1e-5)
    method = BilinearSplit(_Model(head))
    contrast = method.grid(Evidence(fmap[:1]), 2, rather=0)
    scores = logits[0] - head.bilinear.fc.bias
    assert contrast.sum() == pytest.approx(float(scores[2] - scores[0]), rel=1e-4, abs=1e-5)
    assert len(method.parts(Evidence(fmap[:1]), 1, k=3)) == 3


def test_bilinear_map_peaks_where_the_planted_pair_is():
    head = BilinearHead(8, 3, dim=None).eval()
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[2].view(8, 8)[3, 3] = 1.0  # class 2 scores channel 3 with itself
    heat = BilinearSplit(_Model(head)).grid(Evidence(planted_fmap(at=(1, 6))), 2)
    assert argmax2d(heat) == (1, 6)


def test_top_pairs_are_the_largest_contributions_and_add_up():
    head = BilinearHead(8, 3, dim=None).eval()
    fmap = torch.rand(1, 8, 4, 4)
    with torch.no_grad():
        pairs = head.top_pairs(fmap, cls=0, k=5)
        total = head.class_maps(fmap, torch.tensor([0])).sum()
        score = head(fmap)[0, 0] - head.fc.bias[0]
    values = [v for _, _, v, _ in pairs]
    assert values == sorted(values, reverse=True)
    assert all(m.shape == (4, 4) for *_, m in pairs)
    torch.testing.assert_close(total, score, rtol=1e-4, atol=1e-5)


# --- ViT: attention capture and rollout -------------------------------------------------------


def test_rollout_of_identity_attention_stays_on_the_class_token():
    eye = torch.eye(5).expand(1, 2, 5, 5)
    rollout = attention_rollout([eye, eye, eye])
    torch.testing.assert_close(rollout, torch.zeros(1, 4))


def test_rollout_of_uniform_attention_is_uniform():
    uniform = torch.full((1, 3, 10, 10), 0.1)
    rollout = attention_rollout([uniform] * 4)[0]
    torch.testing.assert_close(rollout, torch.full_like(rollout, float(rollout[0])))
    assert float(rollout[0]) > 0


def test_rollout_follows_attention_through_layers():
    """Layer 1: patch 2 reads patch 4. Layer 2: the class token reads patch 2. The class
    token's information came (through patch 2) from patch 4, so both light up, 4 included."""
    n = 6
    layer1, layer2 = torch.eye(n), torch.eye(n)
    layer1[2] = 0.0
    layer1[2, 4] = 1.0
    layer2[0] = 0.0
    layer2[0, 2] = 1.0
    rollout = attention_rollout([layer1[None, None], layer2[None, None]])[0]  # patches 1..5
    assert set(torch.topk(rollout, 2).indices.tolist()) == {1, 3}  # patches 2 and 4
    assert rollout[[0, 2, 4]].abs().max() == 0


def test_recorder_captures_softmaxed_attention_without_changing_the_output():
    torch.manual_seed(1)
    block = Block(16, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 1 + 9, 16)
    with torch.no_grad():
        fused = block(x)  # timm's fused attention: no matrix to see
        recorder = AttentionRecorder(block)
        recorded = block(x)
    torch.testing.assert_close(recorded, fused, rtol=1e-5, atol=1e-5)
    (attention,) = recorder.take()
    assert attention.shape == (2, 4, 10, 10)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 10))
    assert recorder.take() == []  # take() empties it for the next call


class _Model(torch.nn.Module):
    """Just a head, as a model: what explanation methods are built for."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.backbone = torch.nn.Identity()
        self.head = head


def test_each_head_offers_its_own_methods():
    offered = {type(head).__name__: [type(m) for m in explanations_of(_Model(head))] for head in
               (LinearHead(8, 3), BilinearHead(8, 3, dim=4), TransformerHead(8, 3, grid=4, dim=16, heads=4))}
    assert offered == {"LinearHead": [ClassActivationMap], "BilinearHead": [BilinearSplit],
                       "TransformerHead": [TokenContributions, AttentionRelevance, AttentionRollout, LayerAttention]}
    layer = LayerAttention(_Model(TransformerHead(8, 3, grid=4, dim=16, depth=2, heads=4)))
    assert [o.name for o in layer.options()] == ["layer", "head"]
    assert [v for _, v in layer.options()[0].choices] == [0, 1] and layer.options()[1].choices[0][1] is None


def test_transformer_head_explanations_are_grids_and_heads_differ():
    torch.manual_seed(2)
    head = TransformerHead(8, 3, grid=4, dim=16, depth=2, heads=4).eval()
    recorder = AttentionRecorder(head)
    with torch.no_grad():
        head(torch.rand(1, 8, 4, 4))
    attentions = recorder.take()
    assert len(attentions) == 2
    evidence = Evidence(torch.rand(1, 8, 4, 4), attentions)
    model = _Model(head)
    rollout = AttentionRollout(model).grid(evidence, 0)
    assert rollout.shape == (4, 4) and 0 < rollout.sum() < 1  # the class token keeps the rest
    layer = LayerAttention(model)
    mean = layer.grid(evidence, 0, layer=1)
    per_head = [layer.grid(evidence, 0, layer=1, head=h) for h in range(4)]
    np.testing.assert_allclose(mean, np.mean(per_head, axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(per_head[2].ravel(), class_token_attention(attentions[1])[0, 2].numpy())
    # Attention does not depend on the class asked about.
    np.testing.assert_array_equal(rollout, AttentionRollout(model).grid(evidence, 2))
    assert "layer 2" in layer.caption("X", True, layer=1) and "head 3" in layer.caption("X", True, layer=1, head=2)


def _uniform_attention_head(at: tuple[int, int]) -> tuple[TransformerHead, torch.Tensor, int]:
    """A one-layer, one-head transformer head whose attention is uniform (queries and keys
    zeroed, MLP silenced, no position embedding) and whose two logits are opposite: attention
    alone cannot tell a class from the other, every token is the same but one planted token,
    whose value pushes one class up and so the other down. Returns the head, a feature map with
    that token planted, and the favoured class."""
    torch.manual_seed(4)
    head = TransformerHead(8, 2, grid=4, dim=16, depth=1, heads=1).eval()
    with torch.no_grad():
        head.pos_embed.zero_()
        head.fc.weight[1] = -head.fc.weight[0]
        head.fc.bias.zero_()
        for block in head.blocks:
            block.attn.qkv.weight[:32] = 0
            block.attn.qkv.bias[:32] = 0
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
        plain = torch.zeros(1, 8, 4, 4)
        fmap = plain.clone()
        fmap[0, :, at[0], at[1]] = 3.0
        favoured = int(torch.argmax(head(fmap)[0] - head(plain)[0]))
    return head, fmap, favoured


def test_relevance_finds_the_token_a_class_depends_on_and_rollout_does_not_care():
    at = (2, 1)
    head, fmap, favoured = _uniform_attention_head(at)
    model = _Model(head)
    recorder = AttentionRecorder(head)
    with torch.no_grad():
        head(fmap)
    evidence = Evidence(fmap, recorder.take())
    recorder.remove()
    relevance = AttentionRelevance(model)
    assert argmax2d(relevance.grid(evidence, favoured)) == at
    against = relevance.grid(evidence, 1 - favoured)
    assert against[at] == 0 and argmax2d(against) != at  # the token only speaks against that class
    rollout = AttentionRollout(model)
    np.testing.assert_array_equal(rollout.grid(evidence, 0), rollout.grid(evidence, 1))
    assert np.ptp(rollout.grid(evidence, 0)) < 1e-6  # uniform attention: a flat rollout


def test_relevance_of_a_contrast_is_the_gradient_of_the_logit_difference():
    """The batched path (one backward for all classes, contrasts as differences of gradients)
    equals one backward pass of logit_x - logit_y."""
    torch.manual_seed(5)
    head = TransformerHead(8, 4, grid=4, dim=16, depth=3, heads=4).eval()
    fmap = torch.rand(1, 8, 4, 4)
    recorder = AttentionRecorder(head, keep_graph=True)
    logits = head(fmap)
    attentions = recorder.take()
    recorder.remove()
    gradients = torch.autograd.grad(logits[0, 3] - logits[0, 1], attentions)
    expected = gradient_relevance([a.detach() for a in attentions], list(gradients))[0].reshape(4, 4).numpy()
    method = AttentionRelevance(_Model(head))
    got = method.grids(Evidence(fmap), [(0, None), (3, 1), (2, 3)])
    np.testing.assert_allclose(got[1], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(method.grid(Evidence(fmap), 3, rather=1), expected, rtol=1e-5, atol=1e-7)


def test_token_contributions_sum_to_the_logits_when_nothing_else_adds_to_them():
    """With every bias, the class token and the positions zeroed, a class's score is made of the
    patch tokens alone, so their contributions sum to the logit exactly (any depth, batch);
    held-fixed attention, LayerNorm scales and GELU slopes are what make the split exact."""
    torch.manual_seed(7)
    head = TransformerHead(8, 5, grid=4, dim=16, depth=3, heads=4).eval()
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                param.zero_()
        fmap = torch.randn(2, 8, 4, 4)
        logits = head(fmap)
        maps = head.class_maps(fmap, torch.arange(5))
    assert maps.shape == (2, 5, 4, 4)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), logits, rtol=1e-4, atol=1e-5)
    method = TokenContributions(_Model(head))
    np.testing.assert_allclose(method.grid(Evidence(fmap[:1]), 3, rather=1), (maps[0, 3] - maps[0, 1]).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_token_contributions_from_a_reference_split_what_differs_from_it():
    """Measured from a reference feature map, only the locations where the photo differs from it
    get a share; from the photo itself nothing; from a zero map (biases, class token and positions
    zeroed, so its tokens are zero) the same as from zero."""
    torch.manual_seed(3)
    head = TransformerHead(8, 5, grid=4, dim=16, depth=2, heads=4).eval()
    fmap = torch.randn(1, 8, 4, 4)
    reference = fmap.clone()
    reference[..., 2, 1] = 0.0
    classes = torch.arange(5)
    with torch.no_grad():
        apart = head.class_maps(fmap, classes, reference)
        torch.testing.assert_close(head.class_maps(fmap, classes, fmap), torch.zeros(1, 5, 4, 4))
    assert apart[0, :, 2, 1].abs().min() > 0
    apart[0, :, 2, 1] = 0
    torch.testing.assert_close(apart, torch.zeros(1, 5, 4, 4))
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                param.zero_()
        from_zero = head.class_maps(fmap, classes, torch.zeros_like(fmap))
        torch.testing.assert_close(from_zero, head.class_maps(fmap, classes))


def test_token_contributions_find_the_token_a_class_depends_on_and_differ_by_class():
    at = (2, 1)
    head, fmap, favoured = _uniform_attention_head(at)
    method = TokenContributions(_Model(head))
    evidence = Evidence(fmap)
    assert argmax2d(method.grid(evidence, favoured)) == at
    assert argmax2d(-method.grid(evidence, 1 - favoured)) == at  # the token speaks against the other class
    with torch.inference_mode():  # as the engine calls it
        assert argmax2d(head.class_maps(fmap, torch.tensor([favoured]))[0, 0]) == at


def test_class_logits_are_the_logits_and_record_the_class_tokens_row_last():
    """The relevance's forward computes the last block for the class token only: the same logits,
    the same attention before it, and the last layer's attention as the class token's row."""
    torch.manual_seed(6)
    head = TransformerHead(8, 4, grid=4, dim=16, depth=2, heads=4).eval()
    fmap = torch.rand(2, 8, 4, 4)
    recorder = AttentionRecorder(head)
    full = head(fmap)
    whole = recorder.take()
    fast = head.class_logits(fmap)
    rows = recorder.take()
    recorder.remove()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[0], whole[0])
    assert rows[1].shape == (2, 4, 1, 17)
    torch.testing.assert_close(rows[1], whole[1][:, :, :1], rtol=1e-5, atol=1e-6)


def test_cam_and_bilinear_methods_give_their_heads_class_maps():
    fmap = planted_fmap()
    for head, method in ((LinearHead(8, 3), ClassActivationMap), (BilinearHead(8, 3, dim=4), BilinearSplit)):
        head.eval()
        with torch.no_grad():
            expected = head.class_maps(fmap, torch.tensor([2]))[0, 0].numpy()
        np.testing.assert_array_equal(method(_Model(head)).grid(Evidence(fmap), 2), expected)
    parts = BilinearSplit(_Model(BilinearHead(8, 3, dim=4).eval())).parts(Evidence(fmap), 1, k=3)
    assert len(parts) == 3 and all(grid.shape == (7, 7) for _, grid in parts)


# --- drawing ----------------------------------------------------------------------------------


def test_overlay_puts_the_hot_spot_where_the_map_peaks():
    photo = Image.new("RGB", (300, 200), (128, 128, 128))
    heat = np.zeros((4, 4))
    heat[3, 0] = 1.0  # bottom-left cell of the centre square
    box = crop_box(photo.size, {"crop_pct": 1.0})
    assert box == (50.0, 0.0, 250.0, 200.0)
    drawn = np.asarray(overlay(photo, heat, box, opacity=1.0)).astype(int)
    assert drawn.shape == (200, 300, 3)
    hot, cold = drawn[175, 75], drawn[25, 225]
    assert hot[0] > hot[2] + 50 and hot[0] > cold[0] + 50  # Turbo: red when hot, dark blue-black when cold
    assert drawn[100, 10].sum() < 3 * 128  # outside the crop: dimmed photo
    assert peak_location(heat, box) == (75.0, 175.0)


def test_normalise_handles_flat_maps():
    assert normalise(np.full((3, 3), 7.0)).max() == 0
    assert normalise(np.array([[1.0, 3.0]])).tolist() == [[0.0, 1.0]]
