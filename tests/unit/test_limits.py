"""Request limits: elements counted from shapes, admission by count and bytes, and their settings."""

from __future__ import annotations

import pytest
import torch
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server import app, cli
from remoteloss_server.config import ServerConfig
from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError
from remoteloss_server.limits import Admission, Budget, check_elements, request_elements

_LIMIT_ENV = ("REMOTELOSS_MAX_REQUEST_ELEMENTS", "REMOTELOSS_MAX_IN_FLIGHT", "REMOTELOSS_MAX_IN_FLIGHT_BYTES")


def test_request_elements_sum_every_tensor_from_shapes_alone() -> None:
    request = pb.ComputeRequest(
        cross_entropy=pb.CrossEntropy(
            input=codec.encode(torch.zeros(4, 5)), target=codec.encode(torch.zeros(4, dtype=torch.int64)),
            weight=codec.encode(torch.ones(5)),
        ),
        grad_output=codec.encode(torch.ones(())),
    )
    assert request_elements(request) == 20 + 4 + 5 + 1
    # Shapes only: a tensor that declares 2**40 elements and carries no data is counted, not decoded.
    huge = pb.ComputeRequest(mse_loss=pb.MseLoss(input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**20, 2**20])))
    assert request_elements(huge) == 2**40
    assert request_elements(pb.ComputeRequest(mse_loss=pb.MseLoss(input=pb.Tensor(shape=[-3, 7])))) == 0


def test_request_elements_refuses_a_rank_past_max_dims_before_reading_the_shape() -> None:
    request = pb.ComputeRequest(mse_loss=pb.MseLoss(input=pb.Tensor(shape=[1] * 64), target=pb.Tensor(shape=[0] * 65)))
    assert request_elements(request.mse_loss) == 1  # no limit
    expected = r"^mse_loss: target: shape has 65 dimensions, more than the limit of 64$"
    with pytest.raises(InvalidArgumentError, match=expected):
        request_elements(request.mse_loss, max_dims=64, where="mse_loss")
    with pytest.raises(InvalidArgumentError, match=r"^mse_loss: grad_output: shape has 65 dimensions"):
        request_elements(pb.Tensor(shape=[2] * 65), max_dims=64, where="mse_loss: grad_output")


def test_check_elements_names_the_limit() -> None:
    request = pb.ComputeRequest(mse_loss=pb.MseLoss(input=pb.Tensor(shape=[10]), target=pb.Tensor(shape=[10])))
    elements = request_elements(request)
    assert check_elements("mse_loss", elements, 20) == check_elements("mse_loss", elements, None) == 20
    with pytest.raises(InvalidArgumentError, match=r"mse_loss: .*20 elements in all.*max_request_elements of 19"):
        check_elements("mse_loss", elements, 19)


def test_admission_bounds_count_and_bytes_and_frees_places() -> None:
    admission = Admission(max_requests=2, max_bytes=100)
    first = admission.admit(60)
    with pytest.raises(ResourceExhaustedError, match="the server is saturated.*max_in_flight_bytes of 100"):
        admission.admit(41)
    second = admission.admit(40)
    with pytest.raises(ResourceExhaustedError, match="the server is saturated: 2 requests .*its max_in_flight;"):
        admission.admit(0)
    first.release()
    second.release()
    second.release()  # idempotent
    assert (admission.requests, admission.bytes, admission.pending) == (0, 0, 0)
    alone = admission.admit(1000)  # alone, any size is admitted (max_message_bytes bounds it)
    assert admission.bytes == 1000
    alone.release()
    assert (admission.requests, admission.bytes) == (0, 0)


def test_an_answer_counts_until_it_has_left() -> None:
    admission = Admission(max_requests=10, max_bytes=100)
    ticket = admission.admit(10)
    assert admission.pending == 1
    ticket.answered(80)  # computed: no longer pending, but its 90 bytes are still held
    assert (admission.requests, admission.bytes, admission.pending) == (1, 90, 0)
    with pytest.raises(ResourceExhaustedError, match="90 bytes in flight .*answers not yet sent"):
        admission.admit(11)
    ticket.release()
    assert (admission.requests, admission.bytes) == (0, 0)


def test_an_answer_is_counted_before_it_is_computed() -> None:
    admission = Admission(10, 1000, tenant=Budget(10, 100, "max_tenant_in_flight"))
    ticket = admission.admit(10, tenant="t")
    with pytest.raises(InvalidArgumentError, match="^mse_loss: .*about 101 bytes.*tenant t's max_tenant_in_flight_bytes of 100"):
        ticket.reserve(20, 101, "mse_loss")  # could never fit the tightest budget
    ticket.reserve(60, 100, "mse_loss")  # alone: counted, however it fits with the rest
    assert admission.in_flight(tenant="t") == (1, 70)
    other = admission.admit(5, tenant="t")
    with pytest.raises(ResourceExhaustedError, match="^tenant t is saturated: 75 bytes .*answer would add 30"):
        other.reserve(30, 30, "mse_loss")
    ticket.answered(40)  # the real answer replaces the reservation
    assert admission.in_flight(tenant="t") == (2, 55)
    ticket.release()
    other.release()
    assert (admission.requests, admission.bytes, admission.pending) == (0, 0, 0)


def test_a_tenant_or_connection_meets_its_own_budget_first() -> None:
    admission = Admission(
        100, 10_000,
        tenant=Budget(3, 100, "max_tenant_in_flight"),
        connection=Budget(2, 1_000, "max_connection_in_flight"),
    )
    heavy = [admission.admit(60, tenant="heavy", connection="ipv4:a")]
    with pytest.raises(ResourceExhaustedError, match="^tenant heavy is saturated.*max_tenant_in_flight_bytes of 100"):
        admission.admit(41, tenant="heavy", connection="ipv4:b")
    heavy.append(admission.admit(40, tenant="heavy", connection="ipv4:b"))
    # Another tenant, and the same tenant's requests on another connection, are not held back.
    light = admission.admit(50, tenant="light", connection="ipv4:b")
    with pytest.raises(ResourceExhaustedError, match="^this connection is saturated: 2 requests.*max_connection_in_flight;"):
        admission.admit(1, tenant="other", connection="ipv4:b")
    assert admission.in_flight(tenant="heavy") == (2, 100)
    assert admission.in_flight(connection="ipv4:b") == (2, 90)
    for ticket in (*heavy, light):
        ticket.release()
    # Tables keep only who has something in flight: connections come and go.
    assert admission.in_flight(tenant="heavy") == admission.in_flight(connection="ipv4:a") == (0, 0)
    assert (admission._tenants, admission._connections) == ({}, {})
    # A refusal by one budget leaves no place taken in another.
    only = admission.admit(1, tenant="t", connection="c")
    with pytest.raises(ResourceExhaustedError):
        admission.admit(2_000, tenant="u", connection="c")
    only.release()
    assert (admission._tenants, admission._connections, admission.requests) == ({}, {}, 0)


def test_limit_defaults_and_validation() -> None:
    config = ServerConfig()
    assert (config.max_request_elements, config.max_in_flight, config.max_in_flight_bytes) == (2**28, 1024, 2 * 1024**3)
    assert (config.max_tenant_in_flight, config.max_tenant_in_flight_bytes) == (512, 1024**3)
    assert (config.max_connection_in_flight, config.max_connection_in_flight_bytes) == (512, 1024**3)
    for name in (
        "max_request_elements", "max_in_flight", "max_in_flight_bytes", "max_tenant_in_flight",
        "max_tenant_in_flight_bytes", "max_connection_in_flight", "max_connection_in_flight_bytes",
    ):
        with pytest.raises(ValueError, match=f"^{name} must be >= 1"):
            ServerConfig(**{name: 0}).validate()  # type: ignore[arg-type]


def test_limit_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _LIMIT_ENV:
        monkeypatch.delenv(name, raising=False)
    served: list[ServerConfig] = []
    monkeypatch.setattr(app, "serve", served.append)
    assert cli.main(["--max-request-elements=1000", "--max-in-flight=8", "--max-in-flight-bytes=4096"]) == 0
    assert (served[-1].max_request_elements, served[-1].max_in_flight, served[-1].max_in_flight_bytes) == (1000, 8, 4096)
    for name, value in zip(_LIMIT_ENV, ("2000", "16", "8192"), strict=True):
        monkeypatch.setenv(name, value)
    assert cli.main(["--max-in-flight=4"]) == 0  # a flag wins over the environment
    assert (served[-1].max_request_elements, served[-1].max_in_flight, served[-1].max_in_flight_bytes) == (2000, 4, 8192)
    assert cli.main(["--max-tenant-in-flight-bytes=100", "--max-connection-in-flight=3"]) == 0
    assert (served[-1].max_tenant_in_flight_bytes, served[-1].max_connection_in_flight) == (100, 3)
    budgets = app.admission(served[-1])
    assert budgets.tenant is not None and budgets.connection is not None
    assert (budgets.total.bytes, budgets.tenant.bytes, budgets.connection.requests) == (8192, 100, 3)
