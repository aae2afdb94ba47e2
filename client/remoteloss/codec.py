"""numpy and torch arrays <-> ``remoteloss.v1.Tensor`` messages.

Pure functions, no I/O. Tensors travel as dtype + shape + little-endian C-order bytes,
so encoding is one ``tobytes()`` and decoding one ``frombuffer``: no per-element Python
work and no float round trip for half types. torch is imported only when a torch tensor
is passed or asked for, so the client works without it.

Rejections raise ``ValueError`` whose message starts with the argument's name.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from remoteloss.v1 import loss_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "DTypeInfo",
    "allow_read_only_buffers",
    "check_tensor",
    "decode_numpy",
    "decode_torch",
    "dtype_from_torch",
    "encode",
    "encode_into",
    "encode_view",
    "is_torch_tensor",
    "tensor_from",
]

_LITTLE = sys.byteorder == "little"
_MAX_EXTENT = 2**63 - 1  # torch's limit on the product of a shape's sizes (zeros counted as ones)
_NUMPY_MAX_DIMS = 32  # the most dimensions every numpy (1.x and 2.x) can hold


@dataclass(frozen=True)
class DTypeInfo:
    """How one wire dtype maps to numpy and torch."""

    name: str  # torch's name: "float32", "bfloat16", ...
    itemsize: int
    numpy: str | None  # numpy dtype string, little-endian; None where numpy has none (bfloat16)
    floating: bool


DTYPES: dict[pb.DType, DTypeInfo] = {
    pb.DTYPE_FLOAT16: DTypeInfo("float16", 2, "<f2", True),
    pb.DTYPE_BFLOAT16: DTypeInfo("bfloat16", 2, None, True),
    pb.DTYPE_FLOAT32: DTypeInfo("float32", 4, "<f4", True),
    pb.DTYPE_FLOAT64: DTypeInfo("float64", 8, "<f8", True),
    pb.DTYPE_INT32: DTypeInfo("int32", 4, "<i4", False),
    pb.DTYPE_INT64: DTypeInfo("int64", 8, "<i8", False),
    pb.DTYPE_BOOL: DTypeInfo("bool", 1, "|b1", False),
    pb.DTYPE_UINT8: DTypeInfo("uint8", 1, "|u1", False),
    pb.DTYPE_INT8: DTypeInfo("int8", 1, "|i1", False),
    pb.DTYPE_INT16: DTypeInfo("int16", 2, "<i2", False),
}
_BY_NAME: dict[str, pb.DType] = {info.name: code for code, info in DTYPES.items()}
_BY_TORCH: dict[Any, pb.DType] = {}  # torch dtype -> wire dtype, filled as met
_BY_NUMPY: dict[np.dtype[Any], pb.DType] = {
    np.dtype(info.numpy): code for code, info in DTYPES.items() if info.numpy is not None
}


def is_torch_tensor(value: object) -> bool:
    """True for a torch.Tensor, without importing torch when the caller never did."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def dtype_from_torch(dtype: torch.dtype) -> pb.DType:
    """The wire dtype of a torch dtype; ValueError for one the wire cannot carry."""
    code = _BY_TORCH.get(dtype)
    if code is None:
        name = str(dtype).removeprefix("torch.")
        if name not in _BY_NAME:
            raise ValueError(f"dtype {name} cannot be sent; use one of {sorted(_BY_NAME)}")
        code = _BY_TORCH[dtype] = _BY_NAME[name]
    return code


def encode(value: Any, *, name: str = "tensor", requires_grad: bool | None = None) -> pb.Tensor:
    """Encode a torch tensor, numpy array, numpy scalar or Python number/sequence.

    A torch tensor keeps its dtype (bfloat16 included) and, unless overridden, its
    requires_grad. Python floats become float32 and ints int64, as torch.tensor does.
    """
    message = pb.Tensor()
    encode_into(message, value, name=name, requires_grad=requires_grad)
    return message


def encode_into(message: pb.Tensor, value: Any, *, name: str = "tensor", requires_grad: bool | None = None) -> None:
    """``encode``, written into ``message``, a fresh ``Tensor`` (e.g. a field of the message that
    holds it, which saves copying one message into another)."""
    code, shape, array, grad = _prepare(value, name, requires_grad)
    message.dtype = code
    if shape:
        message.shape.extend(shape)
    message.data = array.tobytes()
    if grad:
        message.requires_grad = True


def encode_view(value: Any, *, name: str = "tensor", requires_grad: bool | None = None) -> tuple[pb.Tensor, memoryview]:
    """What ``encode`` gives, but for its ``data``: the message without it, and the bytes it would
    hold as a flat read-only view, of ``value``'s own memory where that already is little-endian
    and C-contiguous (else of a copy). The view is valid while ``value`` is left unchanged."""
    code, shape, array, grad = _prepare(value, name, requires_grad)
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data.toreadonly()
    return pb.Tensor(dtype=code, shape=shape, requires_grad=grad), data


def _prepare(value: Any, name: str, requires_grad: bool | None) -> tuple[pb.DType, tuple[int, ...], Any, bool]:
    """The wire dtype, the shape, a little-endian numpy array holding the data (a view of
    ``value`` where it can be, C-contiguous or not; bfloat16 as int16), and requires_grad."""
    if is_torch_tensor(value):
        return _prepare_torch(value, name, requires_grad)
    array = np.asarray(value)
    if array.dtype == np.float64 and not isinstance(value, np.ndarray | np.generic):
        array = array.astype(np.float32)  # a Python float list, like torch.tensor([...])
    code = _BY_NUMPY.get(array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype)
    if code is None:
        raise ValueError(f"{name}: numpy dtype {array.dtype} cannot be sent")
    info = DTYPES[code]
    assert info.numpy is not None
    return code, array.shape, np.ascontiguousarray(array, dtype=info.numpy), bool(requires_grad)


def _prepare_torch(
    tensor: torch.Tensor, name: str, requires_grad: bool | None
) -> tuple[pb.DType, tuple[int, ...], Any, bool]:
    import torch

    try:
        code = dtype_from_torch(tensor.dtype)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if tensor.layout != torch.strided:
        raise ValueError(f"{name}: {tensor.layout} tensors cannot be sent; call .to_dense() first")
    if not tensor.numel():  # no bytes; numpy cannot hold every empty shape torch can, e.g. [0, 2**62]
        array = np.empty(0, dtype=DTYPES[code].numpy or "<i2")
    elif _LITTLE and tensor.is_cpu and DTYPES[code].numpy is not None:
        plain = tensor.detach().resolve_neg() if tensor.requires_grad or tensor.is_neg() else tensor
        array = plain.numpy()  # strided or not: tobytes writes C order
    else:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if DTYPES[code].itemsize > 1:
            # Reinterpret as plain integers of the same width, which numpy can always view.
            view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[DTYPES[code].itemsize]
            flat = flat.view(view)
        array = flat.numpy()
        if not _LITTLE:
            array = array.astype(f"<{array.dtype.char}")
    grad = tensor.requires_grad if requires_grad is None else requires_grad
    return code, tuple(tensor.shape), array, bool(grad)


def check_tensor(
    message: pb.Tensor,
    name: str,
    *,
    max_elements: int | None = None,
    max_dims: int | None = None,
    data: bytes | bytearray | memoryview | None = None,
) -> DTypeInfo:
    """Check a message's dtype, shape and byte length; return its dtype info.

    ``max_elements`` and ``max_dims`` are optional limits on the element count and the rank. A
    shape whose sizes, with zeros counted as ones, multiply past 2**63 - 1 is rejected as torch
    rejects it. ``data`` is ``message.data`` when the caller has it already: each read of a bytes
    field copies it, which for a large tensor costs time and memory.
    """
    info = DTYPES.get(message.dtype)
    if info is None:
        if message.dtype == pb.DTYPE_UNSPECIFIED:
            raise ValueError(f"{name}: dtype is unset (DTYPE_UNSPECIFIED)")
        raise ValueError(f"{name}: unknown dtype value {message.dtype}")
    sizes = message.shape  # read once: each read makes a new container
    if max_dims is not None and len(sizes) > max_dims:  # before the shape is copied
        raise ValueError(f"{name}: shape has {len(sizes)} dimensions, more than the limit of {max_dims}")
    shape = tuple(sizes)
    numel = _numel(shape, name)
    if max_elements is not None and numel > max_elements:
        raise ValueError(f"{name}: {numel} elements exceed the limit of {max_elements}")
    expected = numel * info.itemsize
    size = len(message.data if data is None else data)
    if size != expected:
        raise ValueError(
            f"{name}: data holds {size} bytes, but shape {list(shape)} of "
            f"{info.name} needs {expected}"
        )
    if message.requires_grad and not info.floating:
        raise ValueError(f"{name}: requires_grad is set, but {info.name} tensors have no gradient")
    return info


def _numel(shape: tuple[int, ...], name: str) -> int:
    """The elements of ``shape``; ValueError for a negative size or sizes that multiply, zeros
    counted as ones, past torch's limit."""
    if not shape:
        return 1
    if min(shape) > 0:  # the common case: the extent is the element count
        numel = math.prod(shape)
        if numel > _MAX_EXTENT:
            raise ValueError(f"{name}: shape {list(shape)} is too large: its sizes multiply past 2**63 - 1")
        return numel
    if any(size < 0 for size in shape):
        raise ValueError(f"{name}: shape {list(shape)} has a negative size")
    if math.prod(max(size, 1) for size in shape) > _MAX_EXTENT:
        raise ValueError(f"{name}: shape {list(shape)} is too large: its sizes multiply past 2**63 - 1")
    return 0


def decode_numpy(
    message: pb.Tensor, name: str = "tensor", *, data: bytes | bytearray | memoryview | None = None
) -> np.ndarray[Any, Any]:
    """Decode to a numpy array (read-only, sharing the message's bytes, or ``data``, which then
    stands for ``message.data``).

    bfloat16 has no numpy dtype: it comes back as float32, exactly (bfloat16 is the
    upper half of a float32).
    """
    if data is None:
        data = message.data
    info = check_tensor(message, name, data=data)
    shape = tuple(message.shape)
    try:
        if info.numpy is None:  # bfloat16
            halves = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            return halves.view(np.float32).reshape(shape)
        return np.frombuffer(data, dtype=info.numpy).reshape(shape)
    except ValueError:  # an empty shape numpy cannot hold, e.g. [0, 2**62]
        raise ValueError(f"{name}: shape {list(shape)} is too large for a numpy array; decode it with torch") from None


def decode_torch(
    message: pb.Tensor,
    name: str = "tensor",
    *,
    max_elements: int | None = None,
    max_dims: int | None = None,
    data: bytes | bytearray | memoryview | None = None,
) -> torch.Tensor:
    """Decode to a CPU torch tensor of the message's dtype, without per-element work.

    The tensor owns a copy of ``message.data``, so it is writable and outlives the message.
    ``data``, when given, stands for ``message.data`` and is not copied: the tensor shares its
    memory (read-only when ``data`` is), which is how a server reads a large request in place
    (and a client gives an answer's large tensor a writable copy of its own).
    ``max_elements`` and ``max_dims`` are as in ``check_tensor``.
    """
    shared = data is not None
    if data is None:
        data = message.data
    info = check_tensor(message, name, max_elements=max_elements, max_dims=max_dims, data=data)
    return tensor_from(info, tuple(message.shape), memoryview(bytearray(data) if not shared else data))


def tensor_from(info: DTypeInfo, shape: tuple[int, ...], view: memoryview) -> torch.Tensor:
    """The CPU tensor of dtype ``info`` and ``shape`` whose memory is ``view``'s (flat bytes, as
    ``check_tensor`` found them to fit), without a copy: ``decode_torch``'s last step."""
    import torch

    dtype = _torch_dtype(info)
    if not len(view):
        return torch.empty(shape, dtype=dtype)
    if not view.readonly and info.numpy is not None and _LITTLE and len(shape) <= _NUMPY_MAX_DIMS:
        # Writable memory of a dtype numpy has: numpy's view of it is cheaper to make than torch.frombuffer's.
        return torch.from_numpy(np.frombuffer(view, dtype=info.numpy).reshape(shape))
    if view.readonly:
        allow_read_only_buffers()
    tensor = torch.frombuffer(view, dtype=dtype)
    if not _LITTLE and info.itemsize > 1:
        tensor = tensor.view(torch.uint8).reshape(-1, info.itemsize).flip(-1).reshape(-1).view(dtype)
    return tensor if len(shape) == 1 else tensor.view(shape)  # frombuffer's is 1-d already


@functools.cache
def _torch_dtype(info: DTypeInfo) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, info.name)
    return dtype


@functools.cache
def allow_read_only_buffers() -> None:
    """Raise, and swallow, torch's once-per-process warning about tensors over read-only memory
    ("The given buffer is not writable..."), so that it never reaches a caller's warnings: the
    tensors ``decode_torch`` makes over a given ``data`` are inputs that nothing writes to.
    ``decode_torch`` calls it; a multi-threaded program calls it first, before its threads record
    warnings, because ``warnings.catch_warnings`` is process-wide."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(memoryview(bytes(1)), dtype=torch.uint8)
