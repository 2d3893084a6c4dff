"""The inference engine shared by every backend (see engine.py for the data flow)."""

from .engine import Engine, EngineConfig, EngineStats
from ..sampling import SamplingParams, make_mask_processor
from .sampling import make_bias_processor
from .sequence import ErrorOutput, PromptOutput, Request, TokenOutput

__all__ = [
    "Engine", "EngineConfig", "EngineStats", "SamplingParams", "Request", "PromptOutput",
    "TokenOutput", "ErrorOutput", "make_mask_processor", "make_bias_processor",
]
