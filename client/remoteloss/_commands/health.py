"""``remoteloss health [--service NAME]``: the standard gRPC health check (grpc.health.v1).

The two messages are built here from a small descriptor, so the check needs only the client's
own dependencies (grpcio and protobuf), not grpcio-health-checking. Exit status: 0 when the
server answers SERVING, 1 otherwise (NOT_SERVING, an unknown service, no server).
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from remoteloss._channel import create_channel, tls_credentials
from remoteloss._errors import _error_from_rpc

__all__ = ["add_arguments", "check", "run"]

_METHOD = "/grpc.health.v1.Health/Check"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--service",
        default="",
        help='the service to ask about, e.g. remoteloss.v1.LossService (default: "", the whole server)',
    )


def run(args: argparse.Namespace) -> int:
    from remoteloss.cli import connection

    settings = connection(args)  # the health service needs no API key, but TLS if the server has it
    credentials = tls_credentials(
        tls=settings["tls"],
        root_certificates=settings["root_certificates"],
        client_cert=settings["client_cert"],
        client_key=settings["client_key"],
    )
    status = check(args.target, service=args.service, timeout=args.timeout, credentials=credentials)
    print(status)
    return 0 if status == "SERVING" else 1


def check(
    target: str,
    *,
    service: str = "",
    timeout: float | None = 30.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> str:
    """The serving status the server reports for ``service``: "SERVING", "NOT_SERVING", ...
    (``credentials``: TLS, as for ``Client``; health checks need no API key).

    A service the server does not know gives "SERVICE_UNKNOWN"; a failed call raises the
    client's exception for its status (``ServiceUnavailableError`` when no server answers).
    """
    request_class, response_class = _messages()
    with create_channel(target, credentials=credentials) as channel:
        call = channel.unary_unary(
            _METHOD,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        try:
            response = call(request_class(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # the protocol's answer for an unknown service
                return "SERVICE_UNKNOWN"
            raise _error_from_rpc(exc) from exc
    return str(response_class.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[response.status].name)


@functools.cache
def _messages() -> tuple[Any, Any]:
    """HealthCheckRequest and HealthCheckResponse of grpc/health/v1/health.proto, in a private pool."""
    file = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3")
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )
