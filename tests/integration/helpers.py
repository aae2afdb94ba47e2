"""Helpers shared by the integration tests: warnings capture, error checks, raw requests."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch

from .cases import Call, Case, OptionSet, tolerance


@dataclass
class Outcome:
    """What one call did: its value or exception, and the warning texts it raised (in order, once each)."""

    value: Any = None
    error: BaseException | None = None
    warnings: tuple[str, ...] = ()
    categories: tuple[type[Warning], ...] = ()


def run(fn: Callable[[], Any]) -> Outcome:
    """Call `fn`, recording every warning instead of raising it (the suite turns warnings into errors)."""
    outcome = Outcome()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome.value = fn()
        except Exception as exc:  # noqa: BLE001 - the caller inspects it
            outcome.error = exc
    texts = list(dict.fromkeys(str(w.message) for w in caught))
    outcome.warnings = tuple(texts)
    outcome.categories = tuple(w.category for w in caught)
    return outcome


def remote(client: Any, call: Call) -> Any:
    """The SDK call that mirrors ``torch.nn.functional.<loss>(*args, **kwargs)``."""
    return getattr(client, call.loss)(*call.args, **call.remote_kwargs())


def assert_same_tensor(actual: Any, expected: torch.Tensor, dtype: torch.dtype, what: str = "loss") -> None:
    assert isinstance(actual, torch.Tensor), f"{what}: expected a torch.Tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, torch gives {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, torch gives {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.detach(), expected.detach(), equal_nan=True, **tolerance(dtype), msg=lambda m: f"{what}: {m}"
    )


def error_text(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        details = details()
    text = str(exc)
    return text if not details or str(details) in text else f"{text} {details}"


def assert_invalid_argument(exc: BaseException | None, loss: str, args: tuple[str, ...]) -> None:
    """The SDK raised InvalidArgumentError (a ValueError) whose message names the loss and an argument."""
    import remoteloss

    assert exc is not None, "the remote call succeeded, but torch rejects these arguments"
    assert isinstance(exc, remoteloss.InvalidArgumentError), (
        f"expected InvalidArgumentError, got {type(exc).__name__}: {exc}"
    )
    assert isinstance(exc, ValueError)
    code = getattr(exc, "code", None)
    if code is not None:
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), code
    text = error_text(exc)
    assert loss in text, f"the message does not name the loss {loss!r}: {text!r}"
    assert any(arg in text for arg in args), f"the message names none of {args}: {text!r}"


def assert_rpc_invalid_argument(exc: grpc.RpcError, loss: str | None, args: tuple[str, ...]) -> None:
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{exc.code()}: {exc.details()}"
    details = exc.details() or ""
    if loss is not None:
        assert loss in details, f"the message does not name the loss {loss!r}: {details!r}"
    if args:
        assert any(arg in details for arg in args), f"the message names none of {args}: {details!r}"


def assert_server_answers(client: Any) -> None:
    """The server still computes a good request correctly."""
    case = Case("mse_loss", torch.float64, True, OptionSet("default"), "mean")
    call = case.build()
    assert_same_tensor(remote(client, call), call.local(), torch.float64)


# ---------------------------------------------------------------------------- raw requests


def message_class(loss: str) -> Any:
    from remoteloss.v1 import loss_pb2 as pb

    field = pb.ComputeRequest.DESCRIPTOR.fields_by_name[loss]
    return getattr(pb, field.message_type.name)


def raw_request(loss: str, tensors: Mapping[str, Any]) -> Any:
    """A ComputeRequest built by hand: the given tensors (torch, numpy or sequences), all else unset."""
    from remoteloss import codec
    from remoteloss.v1 import loss_pb2 as pb

    fields = {
        name: codec.encode(value if isinstance(value, torch.Tensor) else torch.tensor(value), name=name)
        for name, value in tensors.items()
    }
    return pb.ComputeRequest(**{loss: message_class(loss)(**fields)})


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value  # type: ignore[return-value]
