from forethought.weights.registry import DEFAULT_MODEL, REGISTRY, LoadedModel, load_model
from forethought.weights.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "REGISTRY", "LoadedModel", "Tokenizer", "load_model"]
