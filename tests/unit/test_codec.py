"""remoteloss.codec: exact round trips for every dtype, and rejections that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remoteloss import codec
from remoteloss import _wire as wire
from remoteloss.v1 import loss_pb2 as pb

torch.set_num_threads(1)

TORCH_DTYPES = [getattr(torch, info.name) for info in codec.DTYPES.values()]
NUMPY_DTYPES = [info.numpy for info in codec.DTYPES.values() if info.numpy is not None]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)], ids=str)
def test_torch_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _sample(dtype, shape)
    message = codec.encode(tensor, name="input")
    assert message.dtype == codec.dtype_from_torch(dtype)
    assert tuple(message.shape) == shape
    assert len(message.data) == tensor.numel() * tensor.element_size()
    decoded = codec.decode_torch(message, "input")
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip_is_exact(dtype: str) -> None:
    array = _sample(torch.float64, (4, 3)).numpy().astype(dtype)
    decoded = codec.decode_numpy(codec.encode(array, name="input"), "input")
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_numpy_is_sent_little_endian() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    message = codec.encode(array)
    assert message.data == np.arange(6, dtype="<f4").tobytes()
    np.testing.assert_array_equal(codec.decode_numpy(message), array)


def test_non_contiguous_tensors_travel_in_c_order() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    for view in (base.transpose(0, 2), base[:, ::2, 1:], base[:1].expand(3, 3, 4)):
        assert not view.is_contiguous()
        assert torch.equal(codec.decode_torch(codec.encode(view)), view)
    array = base.numpy()[:, ::-1, ::2]
    np.testing.assert_array_equal(codec.decode_numpy(codec.encode(array)), array)


def test_bfloat16_decodes_to_float32_in_numpy_exactly() -> None:
    tensor = _sample(torch.bfloat16, (7,))
    decoded = codec.decode_numpy(codec.encode(tensor))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, tensor.float().numpy())


def test_python_values_follow_torch_tensor() -> None:
    for value in (1.5, [1.0, 2.0], [[1, 2], [3, 4]], True, 7, [True, False]):
        message = codec.encode(value)
        expected = torch.tensor(value)
        assert message.dtype == codec.dtype_from_torch(expected.dtype)
        assert torch.equal(codec.decode_torch(message), expected)


def test_requires_grad_follows_the_tensor_unless_overridden() -> None:
    leaf = torch.ones(2, requires_grad=True)
    assert codec.encode(leaf).requires_grad
    assert not codec.encode(leaf, requires_grad=False).requires_grad
    assert codec.encode(np.ones(2), requires_grad=True).requires_grad


def test_decoded_tensor_owns_its_memory() -> None:
    message = codec.encode(torch.arange(4.0))
    decoded = codec.decode_torch(message)
    decoded += 1
    assert torch.equal(codec.decode_torch(message), torch.arange(4.0))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.ones(2, dtype=np.complex64), "input: numpy dtype complex64 cannot be sent"),
        (np.ones(2, dtype=np.uint32), "input: numpy dtype uint32 cannot be sent"),
        (["a", "b"], "input: numpy dtype <U1 cannot be sent"),
        (torch.ones(2, dtype=torch.complex64), "input: dtype complex64 cannot be sent"),
        (torch.ones(2).to_sparse(), "input: torch.sparse_coo tensors cannot be sent"),
    ],
    ids=["complex-numpy", "uint32", "strings", "complex-torch", "sparse"],
)
def test_encode_rejects_unsendable_values_naming_the_argument(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=f"^{match}"):
        codec.encode(value, name="input")


def _message(**fields: object) -> pb.Tensor:
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=bytes(24))
    for key, value in fields.items():
        if key == "shape":
            del message.shape[:]
            message.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(message, key, value)
    return message


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"data": bytes(23)}, r"target: data holds 23 bytes, but shape \[2, 3\] of float32 needs 24"),
        ({"data": bytes(25)}, "target: data holds 25 bytes"),
        ({"shape": [2, -3]}, r"target: shape \[2, -3\] has a negative size"),
        ({"dtype": pb.DTYPE_UNSPECIFIED}, r"target: dtype is unset \(DTYPE_UNSPECIFIED\)"),
        ({"dtype": 99}, "target: unknown dtype value 99"),
        ({"dtype": pb.DTYPE_INT32, "requires_grad": True}, "target: requires_grad is set, but int32"),
    ],
    ids=["short", "long", "negative-dim", "unspecified", "unknown-dtype", "grad-on-int"],
)
def test_decode_rejects_bad_messages_naming_the_argument(fields: dict[str, object], match: str) -> None:
    message = _message(**fields)
    for decode in (codec.decode_numpy, codec.decode_torch):
        with pytest.raises(ValueError, match=f"^{match}"):
            decode(message, "target")


def test_max_elements_is_enforced() -> None:
    with pytest.raises(ValueError, match="^input: 6 elements exceed the limit of 5$"):
        codec.decode_torch(_message(), "input", max_elements=5)
    assert codec.decode_torch(_message(), "input", max_elements=6).shape == (2, 3)


def test_is_torch_tensor() -> None:
    assert codec.is_torch_tensor(torch.ones(1))
    assert not codec.is_torch_tensor(np.ones(1))


def test_decode_torch_over_given_bytes_shares_them_and_warns_nothing() -> None:
    import warnings

    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    message = codec.encode(values)
    received = bytes(message.data)  # as a server holds a request's bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = codec.decode_torch(message, "input", data=memoryview(received))
    torch.testing.assert_close(tensor, values)
    assert tensor.data_ptr() == np.frombuffer(received, dtype=np.uint8).ctypes.data  # no copy
    with pytest.raises(ValueError, match="data holds 4 bytes"):
        codec.decode_torch(message, "input", data=memoryview(received)[:4])


@pytest.mark.parametrize("shape", [(0, 2**62), (2**63 - 1, 0), (3, 0, 2**61)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_empty_tensors_numpy_cannot_hold_encode_and_decode(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """torch allows sizes that multiply (zeros counted as ones) up to 2**63 - 1; numpy refuses such
    an array when the sizes times the itemsize pass that ("array is too big")."""
    tensor = torch.empty(shape, dtype=dtype, requires_grad=True)
    message = codec.encode(tensor)
    assert list(message.shape) == list(shape) and message.data == b"" and message.requires_grad
    view_message, data = codec.encode_view(tensor, name="g", requires_grad=False)
    assert list(view_message.shape) == list(shape) and data.nbytes == 0
    payloads = wire.attach([(view_message, data)])
    assert payloads is None and view_message.data == b""
    decoded = codec.decode_torch(message, "loss")
    assert decoded.shape == shape and decoded.dtype == dtype
    with pytest.raises(ValueError, match=r"^loss: shape .* is too large for a numpy array"):
        codec.decode_numpy(message, "loss")
