"""reformer_infer: the Reformer model and its inference engine (torch only; no grpc, protobuf or prometheus)."""

from .cache import ReformerCache, SequenceCache
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ReformerConfig
from .defaults import default_model_path
from .generation import generate
from .model import ReformerLM
from .pool import DecodePool
from .tokenizer import TokenizerError, load_tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DecodePool",
    "ReformerCache",
    "ReformerConfig",
    "ReformerLM",
    "SequenceCache",
    "TokenizerError",
    "default_model_path",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
]
