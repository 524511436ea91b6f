"""grpc.health.v1 messages without depending on grpcio-health-checking (the SDK needs grpcio + protobuf only).

The two messages are built from a descriptor in a private pool, so they never clash with the real
`grpc_health` module if an application imports both.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> tuple[type, type]:
    fd = descriptor_pb2.FileDescriptorProto(name="reformer_client/health.proto", package="grpc.health.v1",
                                            syntax="proto3")
    req = fd.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    resp = fd.message_type.add(name="HealthCheckResponse")
    resp.field.add(name="status", number=1, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)  # enum on the wire
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _build()
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
