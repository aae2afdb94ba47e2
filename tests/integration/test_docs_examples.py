"""The Examples of every torch.nn loss class (torch 2.13, torch/nn/modules/loss.py), run remotely.

Each example is read from the class's docstring and run unchanged, except that the loss classes
come from ``nn``: torch.nn for the reference run, and for the remote run a namespace where
``nn.X(...)`` is ``remoteloss.nn.X(..., client=client)`` and everything else (LogSoftmax, Conv2d,
Embedding, PairwiseDistance, Sigmoid) is still torch.nn's. Both runs start from the same seed, so
they draw the same tensors and parameters; every loss call's inputs and output, the tensors and
parameters the example ends with, and every ``.grad`` must agree.

The README's CTC example runs against the test server, and against torch (the same code
with ``remoteloss`` replaced by a stand-in that calls torch directly).
"""

from __future__ import annotations

import functools
import math
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn as torch_nn

README = Path(__file__).resolve().parents[2] / "README.md"

Record = Callable[..., None]


class RemoteNN:
    """torch.nn, with each loss class replaced by remoteloss.nn's, bound to one client."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        import remoteloss.nn as rnn

        if name in rnn.__all__:
            return functools.partial(getattr(rnn, name), client=self._client)
        return getattr(torch_nn, name)


# ---------------------------------------------------------------------------- the examples
# torch's own Examples, read from each loss class's docstring and run as written. One exception:
# TripletMarginWithDistanceLoss's example goes on to pass Python functions as distance_function,
# which cannot travel; its first part runs here, and test_triplet_margin_with_distance_custom_functions
# covers the rest.


def torch_example(name: str) -> str:
    """The code of the Examples in ``torch.nn.<name>``'s docstring: its ``>>>``/``...`` lines."""
    code = []
    for line in (getattr(torch_nn, name).__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped in (">>>", "...") or stripped.startswith((">>> ", "... ")):
            code.append(stripped[4:])
    return "\n".join(code)


def _docstring_example(name: str) -> Callable[[Any, Record], None]:
    code = compile(torch_example(name), f"torch.nn.{name} docstring", "exec")

    def example(nn: Any, rec: Record) -> None:
        namespace: dict[str, Any] = {"torch": torch, "nn": nn, "F": F}
        exec(code, namespace)  # noqa: S102 - torch's own docstring
        rec(**{f"{k}": v for k, v in namespace.items() if isinstance(v, torch.Tensor)})
        for key, value in namespace.items():
            if isinstance(value, torch_nn.Module):
                rec(**{f"{key}.{n}": p for n, p in value.named_parameters()})

    return example


def example_triplet_margin_with_distance(nn: Any, rec: Record) -> None:
    # Initialize embeddings
    embedding = nn.Embedding(1000, 128)
    anchor_ids = torch.randint(0, 1000, (1,))
    positive_ids = torch.randint(0, 1000, (1,))
    negative_ids = torch.randint(0, 1000, (1,))
    anchor = embedding(anchor_ids)
    positive = embedding(positive_ids)
    negative = embedding(negative_ids)

    # Built-in Distance Function
    triplet_loss = nn.TripletMarginWithDistanceLoss(distance_function=nn.PairwiseDistance())
    output = triplet_loss(anchor, positive, negative)
    output.backward()
    rec(output=output, embedding_weight=embedding.weight)
    # The two custom-distance parts (a Python function and a lambda) cannot be sent to a server:
    # see test_triplet_margin_with_distance_custom_functions.


def _examples() -> dict[str, Callable[[Any, Record], None]]:
    import remoteloss.nn as rnn

    hand = {"TripletMarginWithDistanceLoss": example_triplet_margin_with_distance}
    return {name: hand.get(name) or _docstring_example(name) for name in rnn.__all__}


EXAMPLES = _examples()


class Recording:
    """``nn`` for one run of an example: each loss module it makes records its inputs and output."""

    def __init__(self, nn: Any, rec: Record) -> None:
        import remoteloss.nn as rnn

        self._nn, self._rec, self._losses, self._calls = nn, rec, set(rnn.__all__), 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._nn, name)
        if name not in self._losses:
            return attr

        def make(*args: Any, **kwargs: Any) -> Any:
            module = attr(*args, **kwargs)
            module.register_forward_hook(self._record)
            return module

        return make

    def _record(self, module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        call, self._calls = self._calls, self._calls + 1
        tensors = {f"call{call}.arg{i}": t for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)}
        self._rec(**{f"call{call}": output}, **tensors)


def _run(example: Callable[[Any, Record], None], nn: Any) -> dict[str, torch.Tensor]:
    recorded: dict[str, torch.Tensor] = {}

    def rec(**values: torch.Tensor) -> None:
        for name, value in values.items():
            recorded[name] = value

    torch.manual_seed(0)
    example(Recording(nn, rec), rec)
    return recorded


def _compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        torch.testing.assert_close(got.detach(), want.detach(), msg=lambda m, n=name: f"{n}: {m}")
        if want.is_leaf and want.requires_grad:  # no gradient where torch leaves none (no backward)
            assert (got.grad is None) == (want.grad is None), f"{name}.grad: {got.grad} for {want.grad}"
            if want.grad is not None:
                torch.testing.assert_close(got.grad, want.grad, msg=lambda m, n=name: f"{n}.grad: {m}")


def test_every_loss_class_has_an_example() -> None:
    """torch documents an example for every loss class, and each one calls the loss."""
    for name, example in EXAMPLES.items():
        assert any(key.startswith("call") for key in _run(example, torch_nn)), f"{name}: no loss was called"


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_docs_example(client: Any, name: str) -> None:
    example = EXAMPLES[name]
    expected = _run(example, torch_nn)
    actual = _run(example, RemoteNN(client))
    _compare(actual, expected)


def test_triplet_margin_with_distance_custom_functions(client: Any) -> None:
    """The docs' custom distances: a Python callable cannot be sent, and says so; the named
    equivalents (an L-infinity PairwiseDistance with eps=0, remoteloss.CosineDistance()) give
    torch's values and gradients."""
    import remoteloss

    rnn = RemoteNN(client)

    def l_infinity(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return torch.max(torch.abs(x1 - x2), dim=1).values

    torch.manual_seed(0)
    anchor, positive, negative = (torch.randn(1, 128, requires_grad=True) for _ in range(3))
    for custom in (l_infinity, lambda x, y: 1.0 - F.cosine_similarity(x, y)):
        with pytest.raises(TypeError, match="distance_function"):
            rnn.TripletMarginWithDistanceLoss(distance_function=custom, margin=1.5)(anchor, positive, negative)

    pairs = [
        (l_infinity, torch_nn.PairwiseDistance(p=math.inf, eps=0.0), 1.5),
        (lambda x, y: 1.0 - F.cosine_similarity(x, y), remoteloss.CosineDistance(), 1.0),
    ]
    for local_fn, remote_fn, margin in pairs:
        results = []
        for nn_, fn in ((torch_nn, local_fn), (rnn, remote_fn)):
            leaves = [t.detach().clone().requires_grad_() for t in (anchor, positive, negative)]
            output = nn_.TripletMarginWithDistanceLoss(distance_function=fn, margin=margin)(*leaves)
            output.backward()
            results.append((output, [t.grad for t in leaves]))
        (want, want_grads), (got, got_grads) = results
        torch.testing.assert_close(got.detach(), want.detach())
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------- README


def _readme_ctc_example() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    ctc = [b for b in blocks if "ctc" in b.lower()]
    assert ctc, "README.md has no ```python block with a CTC example"
    return ctc[0]


class _LocalClient:
    """Stands in for remoteloss.Client: the same method names, computed by torch directly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    def value_and_grad(
        self, loss: str, *args: Any, wrt: Any = ("input",), grad_output: Any = None, **kwargs: Any
    ) -> Any:
        raise NotImplementedError("the README example is expected to use .backward()")

    def close(self) -> None:
        pass

    def __enter__(self) -> _LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _local_remoteloss() -> tuple[types.ModuleType, types.ModuleType]:
    import remoteloss

    module = types.ModuleType("remoteloss")
    module.Client = _LocalClient  # type: ignore[attr-defined]
    module.CosineDistance = remoteloss.CosineDistance  # type: ignore[attr-defined]
    module.PairwiseDistance = remoteloss.PairwiseDistance  # type: ignore[attr-defined]
    nn_module = types.ModuleType("remoteloss.nn")

    def local_class(cls: type) -> Callable[..., Any]:
        def make(*args: Any, client: Any = None, target: Any = None, **kwargs: Any) -> Any:
            return cls(*args, **kwargs)

        return make

    for name in dir(torch_nn):
        obj = getattr(torch_nn, name)
        if isinstance(obj, type) and issubclass(obj, torch_nn.modules.loss._Loss):
            setattr(nn_module, name, local_class(obj))
    module.nn = nn_module  # type: ignore[attr-defined]
    return module, nn_module


def _exec(code: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def test_readme_ctc_example(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _readme_ctc_example()
    monkeypatch.setenv("REMOTELOSS_TARGET", server.target)
    remote_ns = _exec(code.replace("localhost:50051", server.target))
    module, nn_module = _local_remoteloss()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "remoteloss", module)
        patch.setitem(sys.modules, "remoteloss.nn", nn_module)
        local_ns = _exec(code)

    tensors = {k: v for k, v in local_ns.items() if isinstance(v, torch.Tensor)}
    leaves = {k for k, v in tensors.items() if v.is_leaf and v.requires_grad}
    assert any(tensors[k].grad is not None for k in leaves), "the README example should call .backward()"
    for name, want in tensors.items():
        got = remote_ns[name]
        assert isinstance(got, torch.Tensor), name
        torch.testing.assert_close(got.detach(), want.detach(), msg=lambda m, n=name: f"{n}: {m}")
        if name in leaves and want.grad is not None:
            assert got.grad is not None, f"{name}.grad is None"
            torch.testing.assert_close(got.grad, want.grad, msg=lambda m, n=name: f"{n}.grad: {m}")
