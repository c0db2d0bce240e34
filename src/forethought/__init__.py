"""forethought: what an autoregressive transformer carries from one token to the next, measured."""

from forethought.errors import ForethoughtError
from forethought.model import KVCache, ModelConfig, Transformer
from forethought.model.generate import Generation, generate
from forethought.model.sampling import SamplingParams
from forethought.weights import DEFAULT_MODEL, LoadedModel, Tokenizer, load_model

__all__ = [
    "DEFAULT_MODEL",
    "ForethoughtError",
    "Generation",
    "KVCache",
    "LoadedModel",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "generate",
    "load_model",
]
__version__ = "0.1.0"
