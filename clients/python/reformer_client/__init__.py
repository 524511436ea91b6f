"""reformer_client: Python SDK for reformer-serve (gRPC streaming generation). Needs grpcio + protobuf only.

    from reformer_client import Client
    with Client("127.0.0.1:50051") as client:
        for event in client.generate_stream("Once upon a time", max_new_tokens=32):
            print(event.text, end="", flush=True)

        # Prefill a long document once, then continue from it as often as needed:
        doc = client.create_context(open("doc.txt").read(), ttl_seconds=600)
        print(client.generate(" In summary,", context=doc, max_new_tokens=32).text)
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
    Context,
    ContextInfo,
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
    "Context",
    "ContextInfo",
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
