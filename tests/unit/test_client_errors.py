"""The status-code-to-exception table of remoteloss._errors."""

from __future__ import annotations

import pickle

import grpc
import pytest

import remoteloss
from remoteloss._errors import _ERRORS, LOST_STATUS, RESET_STATUS, _error_from_code, _error_from_rpc

TABLE = {
    grpc.StatusCode.INVALID_ARGUMENT: remoteloss.InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: remoteloss.DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: remoteloss.UnimplementedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: remoteloss.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: remoteloss.ServiceUnavailableError,
    grpc.StatusCode.INTERNAL: remoteloss.InternalServerError,
    grpc.StatusCode.UNAUTHENTICATED: remoteloss.UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: remoteloss.PermissionDeniedError,
    grpc.StatusCode.CANCELLED: remoteloss.CancelledError,
}


class _FakeRpcError(grpc.RpcError):
    """What a failed call raises: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def test_table_is_complete() -> None:
    assert _ERRORS == TABLE


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda code: code.name)
def test_every_code_maps_to_its_class_keeping_code_and_details(code: grpc.StatusCode) -> None:
    error = _error_from_rpc(_FakeRpcError(code, "mse_loss: target has shape [3], input [4]"))
    assert type(error) is TABLE.get(code, remoteloss.LossServiceError)
    assert isinstance(error, remoteloss.LossServiceError)
    assert error.code is code
    assert error.details == "mse_loss: target has shape [3], input [4]"
    assert str(error) == error.details


@pytest.mark.parametrize("details", [LOST_STATUS, f"{RESET_STATUS}; error code 2"])
def test_grpcs_internal_for_a_lost_connection_is_unavailable(details: str) -> None:
    """What gRPC says, as INTERNAL, when a connection was lost under a call (grpc.aio's failed write
    after the server's end, a proxy's reset) is raised as the lost connection it is, once the
    SDK's resends are spent: a caller that tries UNAVAILABLE again does here too."""
    error = _error_from_rpc(_FakeRpcError(grpc.StatusCode.INTERNAL, details))
    assert type(error) is remoteloss.ServiceUnavailableError and error.code is grpc.StatusCode.UNAVAILABLE
    assert details in error.details and "connection to the server was lost" in error.details


def test_python_exception_bases() -> None:
    assert issubclass(remoteloss.InvalidArgumentError, ValueError)
    assert issubclass(remoteloss.DeadlineExceededError, TimeoutError)
    for cls in TABLE.values():
        assert issubclass(cls, remoteloss.LossServiceError)
    with pytest.raises(ValueError, match="bad shape"):
        raise remoteloss.InvalidArgumentError("bad shape")
    with pytest.raises(TimeoutError, match="too slow"):
        raise remoteloss.DeadlineExceededError("too slow")


def test_local_construction_uses_the_class_code() -> None:
    error = remoteloss.InvalidArgumentError("mse_loss: reduction must be one of ...")
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert remoteloss.LossServiceError("x").code is grpc.StatusCode.UNKNOWN


def test_empty_details_fall_back_to_the_code_name() -> None:
    assert str(_error_from_rpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, None))) == "UNAVAILABLE"


def test_rpc_error_without_status_is_unknown() -> None:
    error = _error_from_rpc(grpc.RpcError("lost"))
    assert type(error) is remoteloss.LossServiceError and error.code is grpc.StatusCode.UNKNOWN


def test_errors_pickle_with_their_code() -> None:
    for error in (_error_from_code(grpc.StatusCode.DATA_LOSS, "gone"), remoteloss.DeadlineExceededError("late")):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), copy.code, copy.details) == (type(error), error.code, error.details)
