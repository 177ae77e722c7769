"""Inference: photos in, every model's answer and the evidence for its maps out."""
from birdfg.inference.engine import Engine
from birdfg.inference.results import DISPLAY_SIDE, Comparison, ModelResult, ensemble

__all__ = ["DISPLAY_SIDE", "Comparison", "Engine", "ModelResult", "ensemble"]
