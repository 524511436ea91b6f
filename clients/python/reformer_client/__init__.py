"""reformer_client: Python SDK for reformer-serve (gRPC streaming generation). Needs grpcio + protobuf only.

    from reformer_client import Client
    with Client("127.0.0.1:50051") as client:
        for event in client.generate_stream("Once upon a time", max_new_tokens=32):
            print(event.text, end="", flush=True)
"""

from reformer_client.client import (
    DEFAULT_GENERATE_TIMEOUT,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    NO_RETRY,
    AsyncClient,
    AsyncGenerationStream,
    Client,
    GenerationStream,
    RetryPolicy,
)
from reformer_client.errors import (
    AuthenticationError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    ReformerError,
    RequestCancelledError,
    ServerError,
    UnavailableError,
)
from reformer_client.types import (
    Finished,
    FinishReason,
    GenerateResult,
    GenerationDefaults,
    HealthStatus,
    ModelConfig,
    ModelInfo,
    PrefillProgress,
    ServerLimits,
    StreamEvent,
    TextChunk,
    Timings,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_GENERATE_TIMEOUT",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AsyncClient",
    "AsyncGenerationStream",
    "AuthenticationError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FinishReason",
    "Finished",
    "GenerateResult",
    "GenerationDefaults",
    "GenerationStream",
    "HealthStatus",
    "InvalidRequestError",
    "NotFoundError",
    "ModelConfig",
    "ModelInfo",
    "OverloadedError",
    "PermissionDeniedError",
    "PrefillProgress",
    "ReformerError",
    "RequestCancelledError",
    "RetryPolicy",
    "ServerError",
    "ServerLimits",
    "StreamEvent",
    "TextChunk",
    "Timings",
    "TokenLogprob",
    "TokenizerInfo",
    "TopLogprob",
    "UnavailableError",
    "Usage",
]
