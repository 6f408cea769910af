"""Names both ends of the contract share: the service name and the finish-reason enum's mapping."""

from __future__ import annotations

from protos import tandem_pb2

SERVICE_NAME = tandem_pb2.DESCRIPTOR.services_by_name["Generation"].full_name   # "tandem.v1.Generation"

FINISH_TO_PROTO = {
    None: tandem_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": tandem_pb2.FINISH_REASON_STOP,
    "length": tandem_pb2.FINISH_REASON_LENGTH,
    "abort": tandem_pb2.FINISH_REASON_ABORT,
}
FINISH_FROM_PROTO = {code: reason for reason, code in FINISH_TO_PROTO.items()}


def reflected_services() -> tuple[str, ...]:
    """What a reflection client (grpcurl, grpcui) can list and call on a server or balancer without the .proto."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection

    return (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
