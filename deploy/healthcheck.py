#!/usr/bin/env python
"""Probe a reformer-server through the standard gRPC health service; exit 0 only when it is SERVING.

The Docker image's HEALTHCHECK runs this, and the Kubernetes Deployment can run it as an `exec` probe
where the native gRPC probe cannot reach the server: kubelet's gRPC probe speaks neither TLS nor bearer
tokens (https://kubernetes.io/docs/tasks/configure-pod-container/configure-liveness-readiness-startup-probes/).

It reads the same REFORMER_* environment variables as the server, so inside the container it needs no
arguments: REFORMER_PORT (default 50051), REFORMER_TLS_CERT (when set the probe uses TLS and trusts that
certificate), REFORMER_AUTH_TOKEN (sent as `authorization: Bearer ...`). Only grpcio and
grpcio-health-checking are needed, both dependencies of the server. Mutual TLS (REFORMER_TLS_CLIENT_CA)
is not supported: the probe presents no client certificate.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The server reports "" for the process and the generation service name for readiness to serve requests.
READINESS_SERVICE = "reformer.v1.TextGeneration"

log = logging.getLogger("reformer-healthcheck")


def _channel(address: str, tls_cert: str | None, tls_server_name: str | None) -> grpc.Channel:
    if not tls_cert:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_cert).read_bytes())
    # The certificate names the public host, the probe dials localhost: let the caller say which name to check.
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str,
    service: str = READINESS_SERVICE,
    timeout_s: float = 4.0,
    tls_cert: str | None = None,
    tls_server_name: str | None = None,
    auth_token: str | None = None,
) -> bool:
    """Return True when the health service at `address` reports `service` as SERVING."""
    metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else None
    with _channel(address, tls_cert, tls_server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=metadata
            )
        except grpc.RpcError as err:
            log.error("health check of %r at %s failed: %s %s", service, address, err.code(), err.details())
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        log.error("service %r at %s is %s", service, address, status)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default=f"127.0.0.1:{env.get('REFORMER_PORT', '50051')}")
    parser.add_argument(
        "--service",
        default=READINESS_SERVICE,
        help='health service name: "" for liveness of the process, the gRPC service name for readiness',
    )
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-cert", default=env.get("REFORMER_TLS_CERT") or None)
    parser.add_argument(
        "--tls-server-name", help="host name to verify in the server certificate (default: the address)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    healthy = check(
        args.address,
        service=args.service,
        timeout_s=args.timeout,
        tls_cert=args.tls_cert,
        tls_server_name=args.tls_server_name,
        auth_token=env.get("REFORMER_AUTH_TOKEN") or None,
    )
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
