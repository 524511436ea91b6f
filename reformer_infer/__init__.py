"""reformer_infer: the Reformer model and its inference engine (torch only; no grpc, protobuf or prometheus)."""

from .cache import ReformerCache, SequenceCache
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ReformerConfig
from .model import ReformerLM

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ReformerCache",
    "ReformerConfig",
    "ReformerLM",
    "SequenceCache",
    "load_model",
    "save_model",
]

try:  # pieces owned by other modules; present once they land
    from .generation import generate  # noqa: F401

    __all__.append("generate")
except ImportError:  # pragma: no cover
    pass
try:
    from .defaults import default_model_path  # noqa: F401

    __all__.append("default_model_path")
except ImportError:  # pragma: no cover
    pass
