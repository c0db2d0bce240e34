from forethought.model.config import ModelConfig
from forethought.model.kv_cache import KVCache
from forethought.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
