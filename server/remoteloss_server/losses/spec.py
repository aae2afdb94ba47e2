"""``LossSpec``: how one per-loss request message becomes a validated torch call.

Decoding is generic, driven by the message descriptor: a ``Tensor`` field is decoded with the
codec, the ``Reduction`` enum becomes torch's string, an ``optional`` scalar that is present
becomes a keyword argument. Options left unset take torch's own defaults, read from the
signature of the ``torch.nn.functional`` function, so no default is typed twice. What cannot be
generic (``var_float``, ``distance_function``, ``options``) is a small per-field hook, and what
torch checks only on the device (class indices) is a per-loss check run on the host.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss._wire import Payloads
from remoteloss_server.errors import InvalidArgumentError
from remoteloss_server.losses.batching import BatchRule
from remoteloss_server.losses.call import Call

__all__ = [
    "ANY",
    "CLASS_INDEX",
    "FLOATING",
    "INT64",
    "INTEGER",
    "MAX_DIMS",
    "REAL",
    "Args",
    "Call",
    "Check",
    "Dtypes",
    "LossSpec",
    "OptionHook",
    "Rule",
    "TensorArg",
    "dtype_names",
]

# Dtype sets for TensorArg.dtypes: each argument accepts the union of the dtypes torch accepts
# for it in some valid call on some device; combinations torch rejects (a float16 weight with a
# float32 input) and kernels a device lacks (float16 on CPU) are left to torch's own message.
FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
INTEGER = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
REAL = FLOATING | INTEGER
ANY = REAL | {torch.bool}
CLASS_INDEX = frozenset({torch.int64, torch.uint8})  # what nll_loss takes as class indices
INT64 = frozenset({torch.int64})
Dtypes = frozenset[torch.dtype]
# The most dimensions a tensor may have. torch has no limit, but its CUDA kernels take at most 25
# dimensions, and some CPU kernels slow down with the rank squared (100000 dimensions: a minute).
MAX_DIMS = 64

_STANDARD_REDUCTIONS = ("none", "mean", "sum")
_REDUCTIONS: dict[int, str] = {
    value.number: value.name.removeprefix("REDUCTION_").lower()
    for value in pb.Reduction.DESCRIPTOR.values
    if value.number != pb.REDUCTION_UNSPECIFIED
}
_ORDER = [  # how messages list dtypes
    *(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    *(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool),
]


def dtype_names(dtypes: Dtypes) -> str:
    """``"float16, bfloat16, ..."``, in a stable order, for messages."""
    return ", ".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=_ORDER.index))


@dataclass(frozen=True)
class TensorArg:
    """One tensor argument of a loss, named as in torch and in the request message."""

    name: str
    dtypes: Dtypes
    shape: str  # torch's shape rule, in words, for ListLosses
    required: bool = True
    differentiable: bool = True  # False: torch raises when it requires grad, so we reject it first

    def __post_init__(self) -> None:
        if not any(d.is_floating_point for d in self.dtypes):  # integers never require grad
            object.__setattr__(self, "differentiable", False)


@dataclass(frozen=True)
class Args:
    """Decoded arguments, still on the host, as the per-loss checks see them."""

    loss: str
    tensors: Mapping[str, torch.Tensor]
    options: Mapping[str, Any]  # every option, torch's default where the request left it unset
    requires_grad: frozenset[str]
    max_elements: int | None = None  # the most elements a tensor the call implies may have; None: no limit
    implied: list[int] = field(default_factory=list)  # elements of each tensor the checks said the call implies

    def fail(self, message: str) -> NoReturn:
        raise InvalidArgumentError(f"{self.loss}: {message}")

    def limit(self, elements: int, what: Callable[[], str]) -> None:
        """Fail when a tensor the call implies (``what()`` names it) would exceed ``max_elements``;
        else note its size (``Call.implied_elements``)."""
        self.implied.append(elements)
        if self.max_elements is not None and elements > self.max_elements:
            self.fail(
                f"{what()} would hold {elements} elements, more than this server's limit of {self.max_elements}"
            )


@dataclass(frozen=True)
class Rule:
    """An option value torch rejects, for docs/VALIDATION.md; ``example`` is a request field (JSON,
    merged into a good request of the loss, after clearing the fields in ``clear``) that breaks the
    rule, and a test sends it to a server."""

    argument: str
    rule: str
    example: Mapping[str, Any]
    clear: tuple[str, ...] = ()


Check = Callable[[Args], None]
OptionHook = Callable[[str, Any], dict[str, Any]]  # (loss name, loss message) -> keyword arguments


@dataclass(frozen=True)
class LossSpec:
    """One loss: its torch function, tensor arguments, option hooks, host-side checks, the option
    values torch rejects, and its batch rule."""

    name: str  # the torch.nn.functional name and the ComputeRequest field
    module: str  # the torch.nn class, e.g. "MSELoss"
    tensors: tuple[TensorArg, ...]
    checks: tuple[Check, ...] = ()
    hooks: Mapping[str, OptionHook] = field(default_factory=dict)  # message field -> decoder
    reductions: tuple[str, ...] = _STANDARD_REDUCTIONS
    rejects: tuple[Rule, ...] = ()  # option values torch itself rejects (torch's check, not ours)
    batch: BatchRule | None = None  # how calls share a batch; None: each call runs alone
    _scalars: tuple[str, ...] = field(init=False, repr=False)
    _defaults: Mapping[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Tie the spec to its message and to torch's signature; a mismatch is a bug, caught at import."""
        signature = self.signature
        tensor_fields = {f.name for f in self.descriptor.fields if f.message_type is pb.Tensor.DESCRIPTOR}
        if tensor_fields != {t.name for t in self.tensors}:
            raise TypeError(f"{self.name}: spec tensors differ from the message's {sorted(tensor_fields)}")
        scalars = []
        for f in self.descriptor.fields:
            if f.name in tensor_fields or f.name in self.hooks or f.enum_type is pb.Reduction.DESCRIPTOR:
                continue
            if f.message_type is not None or not f.has_presence or f.name not in signature.parameters:
                raise TypeError(f"{self.name}: no decoder for field {f.name!r}")
            scalars.append(f.name)
        for name in (*tensor_fields, "reduction"):
            if name not in signature.parameters:
                raise TypeError(f"{self.name}: torch has no argument {name!r}")
        defaults = {
            p.name: p.default
            for p in signature.parameters.values()
            if p.name not in tensor_fields and p.default is not inspect.Parameter.empty
        }
        object.__setattr__(self, "_scalars", tuple(scalars))
        object.__setattr__(self, "_defaults", defaults)

    @property
    def function(self) -> Callable[..., torch.Tensor]:
        fn: Callable[..., torch.Tensor] = _INSTEAD.get(self.name) or getattr(F, self.name)
        return fn

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.function)

    @property
    def descriptor(self) -> Descriptor:
        message_type = pb.ComputeRequest.DESCRIPTOR.fields_by_name[self.name].message_type
        assert isinstance(message_type, Descriptor)
        return message_type

    def prepare(
        self,
        message: Message,
        device: torch.device | str,
        *,
        max_elements: int | None = None,
        payloads: Payloads | None = None,
    ) -> Call:
        """Decode and validate one per-loss message; raise InvalidArgumentError naming the argument.

        ``max_elements`` bounds every tensor sent and every one its arguments imply (a broadcast,
        linear_cross_entropy's logits, ctc_loss's alignment table); None: no bound. ``payloads``:
        the message came from ``wire.split``, and its tensors' bytes are read there, in place.
        """
        tensors = self._decode_tensors(message, max_elements, payloads)
        requires_grad = tuple(t.name for t in self.tensors if t.name in tensors and _requires_grad(message, t.name))
        options = dict(self._defaults)
        options.update(self._decode_options(message))
        return self.call(tensors, options, requires_grad, max_elements, device)

    def call(
        self,
        tensors: dict[str, torch.Tensor],
        options: dict[str, Any],
        requires_grad: tuple[str, ...],
        max_elements: int | None = None,
        device: torch.device | str = "cpu",
    ) -> Call:
        """The call of decoded arguments (every option set), once the loss's checks, which may read
        the tensors' values, have passed: ``prepare``'s last step, and a request template's."""
        args = Args(self.name, tensors, options, frozenset(requires_grad), max_elements)
        for check in self.checks:
            check(args)
        if device != "cpu":
            tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        return Call(self.name, self.function, tensors, options, requires_grad, max(args.implied, default=0))

    def _decode_tensors(
        self, message: Message, max_elements: int | None, payloads: Payloads | None
    ) -> dict[str, torch.Tensor]:
        tensors = {}
        for arg in self.tensors:
            if not message.HasField(arg.name):
                if arg.required:
                    raise InvalidArgumentError(f"{self.name}: {arg.name} is required")
                continue
            sent = getattr(message, arg.name)
            try:
                tensor = codec.decode_torch(
                    sent, arg.name, max_elements=max_elements, max_dims=MAX_DIMS,
                    data=None if payloads is None else payloads.resolve(sent.data),
                )
            except ValueError as exc:
                raise InvalidArgumentError(f"{self.name}: {exc}") from None
            if tensor.dtype not in arg.dtypes:
                raise InvalidArgumentError(
                    f"{self.name}: {arg.name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                    f"but must be one of {dtype_names(arg.dtypes)}"
                )
            if not arg.differentiable and _requires_grad(message, arg.name):
                raise InvalidArgumentError(
                    f"{self.name}: {arg.name} cannot require grad; torch does not differentiate "
                    f"{self.name} with respect to {arg.name}"
                )
            tensors[arg.name] = tensor
        return tensors

    def _decode_options(self, message: Message) -> dict[str, Any]:
        options: dict[str, Any] = {}
        reduction = getattr(message, "reduction")
        if reduction != pb.REDUCTION_UNSPECIFIED:
            name = _REDUCTIONS.get(reduction)
            if name is None:
                raise InvalidArgumentError(f"{self.name}: reduction has an unknown value {reduction}")
            if name not in self.reductions:
                raise InvalidArgumentError(
                    f"{self.name}: reduction {name!r} is not supported; use one of {', '.join(self.reductions)}"
                )
            options["reduction"] = name
        for name in self._scalars:
            if message.HasField(name):
                options[name] = getattr(message, name)
        for hook in self.hooks.values():
            options.update(hook(self.name, message))
        return options


def _requires_grad(message: Message, name: str) -> bool:
    return bool(getattr(message, name).requires_grad)


# Losses whose empty batch torch 2.13 reduces (sum or mean) to 8 bytes of memory it never wrote:
# in a server, possibly another caller's. Here they answer what torch's other losses do.
EMPTY_BATCH_UNWRITTEN = frozenset({"multi_margin_loss", "multilabel_margin_loss"})


def _written_when_empty(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss``, except that an empty batch's sum is 0 and its mean NaN (the sum and mean of nothing)."""

    @functools.wraps(loss)
    def written(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = loss(*args, **kwargs)
        x: torch.Tensor = kwargs["input"] if "input" in kwargs else args[0]
        if out.dim() == 0 and x.numel() == 0:
            return x.sum() if kwargs.get("reduction", "mean") == "sum" else x.mean()
        return out

    return written


_INSTEAD: dict[str, Callable[..., torch.Tensor]] = {
    name: _written_when_empty(getattr(F, name)) for name in sorted(EMPTY_BATCH_UNWRITTEN)
}
