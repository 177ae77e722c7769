"""Inference: photos in, every model's answer and the evidence for its maps out."""
from birdfg.inference.engine import DISPLAY_SIDE, Engine
from birdfg.inference.results import Comparison, ModelResult, ensemble

__all__ = ["DISPLAY_SIDE", "Comparison", "Engine", "ModelResult", "ensemble"]
