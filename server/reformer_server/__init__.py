"""reformer_server: the gRPC server of reformer-serve (grpc.aio over the reformer_infer engine).

Run it with `reformer-server` or `python -m reformer_server`; see `reformer-server --help`.
"""

from reformer_server.config import ServerConfig, parse_config

__all__ = ["ServerConfig", "parse_config"]
