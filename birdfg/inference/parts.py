"""The pieces of a model set the engine runs, as plain torch modules with tensor outputs (so that
a whole group can be exported to ONNX as one graph): a trunk shared by several models, each
model's own part, and a group of them as one module.

A model's part returns `probs` and the evidence its explanations need (`features`, every
recorded attention matrix), all from one forward pass.
"""
from __future__ import annotations

import torch
from torch import nn

from birdfg.attention import AttentionRecorder

Outputs = dict[str, torch.Tensor]  # "probs", "features", "attention.<i>", "shared"


class ModelPart(nn.Module):
    """One model's own part: its top stages and head, from the shared trunk's output; or, with
    `from_photos`, the whole model, whose backbone output then comes back as `shared` too."""

    def __init__(self, model: nn.Module, from_photos: bool):
        super().__init__()
        self.model = model
        self.from_photos = from_photos
        self.recorder = AttentionRecorder(model)
        self.recorder.armed = False  # records this part's own passes only, not other runs of the model

    def forward(self, x: torch.Tensor) -> Outputs:
        self.recorder.take()  # nothing a failed earlier call left behind
        self.recorder.armed = True
        try:
            return self._forward(x)
        finally:
            self.recorder.armed = False

    def _forward(self, x: torch.Tensor) -> Outputs:
        shared = self.model.shared_features(x) if self.from_photos else x
        features = self.model.top(shared)  # Identity unless the model trains its own top
        out = {"probs": self.model.head(features).float().softmax(-1), "features": features}
        if self.recorder.keeping:
            out.update({f"attention.{i}": a for i, a in enumerate(self.recorder.take())})
        if self.from_photos:
            out["shared"] = shared
        return out


class GroupPart(nn.Module):
    """Models that share a trunk (`trunk`: its backbone, or None for a group of one that runs its
    whole model): the trunk once, then every model's part. Outputs are named "<key>.<output>",
    the trunk's "shared"."""

    def __init__(self, trunk: nn.Module | None, parts: dict[str, ModelPart]):
        super().__init__()
        self.trunk = trunk
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor) -> Outputs:
        shared = self.trunk.forward_features(x) if self.trunk is not None else x
        out = {f"{key}.{name}": t for key, part in self.parts.items() for name, t in part(shared).items()}
        if self.trunk is not None:
            out["shared"] = shared
        return out

    def keep_attention(self, keeping: bool) -> None:
        for part in self.parts.values():
            part.recorder.keeping = keeping
