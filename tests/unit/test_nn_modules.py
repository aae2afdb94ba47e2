"""remoteloss.nn mirrors torch.nn's loss classes; no server needed (a fake client computes locally)."""

from __future__ import annotations

import copy
import inspect
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import numpy as np  # noqa: E402
import remoteloss.nn as rnn  # noqa: E402
from remoteloss import _nn_client  # noqa: E402
from remoteloss._samples import ENTRIES, RemoteOnly  # noqa: E402
from remoteloss_server.losses import LOSSES  # noqa: E402

EXTRA = ("client", "target")

# Originals, taken before any test patches torch.nn.functional.
_F = {name: getattr(F, name) for name in dir(F) if not name.startswith("_")}
F_ORIGINAL = _F


class FakeClient:
    """Stands in for remoteloss.Client: records each call and computes it with torch locally."""

    def __init__(self, target: str = "fake") -> None:
        self.target = target
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in _F:
            raise AttributeError(name)
        fn = _F[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)

        return call


@dataclass
class Case:
    ctor: Callable[[], dict[str, Any]]  # constructor kwargs (fresh tensors each time)
    inputs: Callable[[], tuple[Any, ...]]
    functional: str
    args: tuple[Any, ...] = field(default=())  # positional constructor args


def _tensor(value: Any, requires_grad: bool = False) -> Any:
    if not isinstance(value, np.ndarray):
        return value
    tensor = torch.from_numpy(value.copy())
    return tensor.requires_grad_() if requires_grad and tensor.is_floating_point() else tensor


def _module_arguments(loss: str, values: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """A sample's arguments as the nn class takes them: (constructor args, constructor options,
    the names forward takes, in order)."""
    parameters = inspect.signature(F_ORIGINAL[loss]).parameters.values()
    positional = [p.name for p in parameters if p.default is inspect.Parameter.empty]
    args: tuple[Any, ...] = ()
    if loss == "linear_cross_entropy":  # the layer's weight and bias are the module's parameters
        weight = values.pop("linear_weight")
        positional.remove("linear_weight")
        args = (weight.shape[-1], weight.shape[0])
        values |= {"out_features": tuple(weight.shape[1:-1]), "bias": "linear_bias" in values, "dtype": torch.float64}
        values.pop("linear_bias", None)
    return args, {k: v for k, v in values.items() if k not in positional}, positional


def _case(index: int, spec: Any) -> Case:
    """The nn class's case, from the option set of the loss's sample entry that sets the most
    arguments the class takes (no deprecated ones, none for particular dtypes, none spelled
    differently remotely): options and tensors the constructor takes go to it; torch's positional
    arguments go to forward (the floating ones torch differentiates require grad); reductions
    vary from loss to loss."""
    loss, entry = spec.name, ENTRIES[spec.name]
    accepted = set(inspect.signature(getattr(torch.nn, spec.module).__init__).parameters)
    candidates = []
    for option_set in entry.option_sets:
        if option_set.reductions is not None or option_set.dtypes is not None or True not in option_set.batched:
            continue
        values = entry.arguments(index, opts=option_set.opts)
        args, options, positional = _module_arguments(loss, values)
        if set(options) <= accepted and not any(isinstance(v, RemoteOnly) for v in options.values()):
            candidates.append((len(options), -len(candidates), args, options, positional, values))
    _, _, args, options, positional, values = max(candidates, key=lambda c: c[:2])  # the first of the richest
    differentiable = {t.name for t in spec.tensors if t.differentiable}
    reduction = entry.reductions[index % len(entry.reductions)]
    return Case(
        lambda: {**{k: _tensor(v) for k, v in options.items()}, "reduction": reduction},
        lambda: tuple(_tensor(values[n], n in differentiable) for n in positional),
        loss,
        args,
    )


CASES: dict[str, Case] = {spec.module: _case(i, spec) for i, spec in enumerate(LOSSES.values())}
NAMES = sorted(CASES)


def _pair(name: str, **extra: Any) -> tuple[Any, Any]:
    """The torch module and ours, built with equal arguments and holding equal state."""
    case = CASES[name]
    kwargs = case.ctor()
    ours = getattr(rnn, name)(*case.args, **kwargs, **extra)
    theirs = getattr(torch.nn, name)(*case.args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, torch.nn.Module):
        return type(a) is type(b) and repr(a) == repr(b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name not in EXTRA]


# --------------------------------------------------------------------------- the class list


def test_all_is_sorted_and_names_every_torch_loss_class() -> None:
    torch_losses = set(torch.nn.modules.loss.__all__) - {"NLLLoss2d"}  # NLLLoss2d: deprecated alias of NLLLoss
    assert rnn.__all__ == sorted(rnn.__all__)
    assert set(rnn.__all__) == torch_losses == set(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_class_mirrors_torch_class(name: str) -> None:
    cls, torch_cls = getattr(rnn, name), getattr(torch.nn, name)
    assert issubclass(cls, torch_cls) and cls.__name__ == name
    assert "forward" in cls.__dict__, "forward must be overridden, or it would compute locally"


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_matches_torch(name: str) -> None:
    cls, torch_cls = getattr(rnn, name), getattr(torch.nn, name)
    assert _params(cls.__init__) == _params(torch_cls.__init__)
    extra = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name in EXTRA]
    assert [(p.name, p.kind, p.default) for p in extra] == [
        ("client", inspect.Parameter.KEYWORD_ONLY, None),
        ("target", inspect.Parameter.KEYWORD_ONLY, None),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_forward_signature_matches_torch(name: str) -> None:
    cls, torch_cls = getattr(rnn, name), getattr(torch.nn, name)
    assert inspect.signature(cls.forward) == inspect.signature(torch_cls.forward)


# --------------------------------------------------------------------------- state and repr


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_buffers_and_repr_match_torch(name: str) -> None:
    case = CASES[name]
    kwargs = case.ctor()
    ours = getattr(rnn, name)(*case.args, **kwargs, client=FakeClient())
    theirs = getattr(torch.nn, name)(*case.args, **kwargs)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert {k: (v.shape, v.dtype) for k, v in ours_sd.items()} == {k: (v.shape, v.dtype) for k, v in theirs_sd.items()}
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert repr(ours) == repr(theirs)
    ours.load_state_dict(theirs_sd)  # strict


def test_linear_cross_entropy_stores_the_linear_layer_flat() -> None:
    loss = rnn.LinearCrossEntropyLoss(5, 4, out_features=(2, 3), bias=True, client=FakeClient())
    assert loss.linear.weight.shape == (4 * 2 * 3, 5)
    assert loss.linear.bias is not None and loss.linear.bias.shape == (4 * 2 * 3,)
    assert "in_features=5, num_classes=4, out_features=(2, 3), bias=True" in repr(loss)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_match_torch(name: str) -> None:
    args = CASES[name].args
    ours, theirs = getattr(rnn, name)(*args), getattr(torch.nn, name)(*args)
    assert repr(ours) == repr(theirs)
    public = {k: v for k, v in vars(theirs).items() if not k.startswith("_")}
    assert _same({k: vars(ours)[k] for k in public}, public)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", NAMES)
def test_forward_calls_the_client_exactly_as_torch_calls_functional(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    fake = FakeClient()
    theirs, ours = _pair(name, client=fake)
    torch_calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    functional = CASES[name].functional

    def record(*args: Any, **kwargs: Any) -> Any:
        torch_calls.append((functional, args, kwargs))
        return _F[functional](*args, **kwargs)

    monkeypatch.setattr(F, functional, record)
    inputs = CASES[name].inputs()
    expected = theirs(*inputs)
    got = ours(*inputs)

    assert len(torch_calls) == 1 and len(fake.calls) == 1
    assert _same(fake.calls[0], torch_calls[0])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_like_torch(name: str) -> None:
    torch.manual_seed(1)
    theirs, ours = _pair(name, client=FakeClient())
    inputs = CASES[name].inputs()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    theirs(*inputs).sum().backward()
    expected = [t.grad for t in leaves]  # None where torch leaves no gradient (cosine's target)
    for t in leaves:
        t.grad = None
    ours(*inputs).sum().backward()
    for t, g in zip(leaves, expected, strict=True):
        assert (t.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(t.grad, g, equal_nan=True)  # NaN where torch's is (Stirling's at 0)
    for p, q in zip(theirs.parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_gaussian_nll_loss_passes_a_float_var_through() -> None:
    fake = FakeClient()
    rnn.GaussianNLLLoss(client=fake)(torch.randn(3), torch.randn(3), 0.5)
    assert fake.calls[0][1][2] == 0.5


def test_triplet_with_distance_passes_a_custom_distance_function() -> None:
    fake = FakeClient()
    loss = rnn.TripletMarginWithDistanceLoss(distance_function=F.pairwise_distance, client=fake)
    loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3))
    assert fake.calls[0][2]["distance_function"] is F.pairwise_distance


# --------------------------------------------------------------------------- constructor checks


LEGACY = [n for n in NAMES if "size_average" in inspect.signature(getattr(torch.nn, n).__init__).parameters]


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("size_average, reduce", [(False, None), (None, False), (True, True)])
def test_deprecated_size_average_and_reduce_resolve_like_torch(
    name: str, size_average: bool | None, reduce: bool | None
) -> None:
    with warnings.catch_warnings(record=True) as torch_warned:
        warnings.simplefilter("always")
        theirs = getattr(torch.nn, name)(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as our_warned:
        warnings.simplefilter("always")
        ours = getattr(rnn, name)(size_average=size_average, reduce=reduce)
    assert ours.reduction == theirs.reduction
    assert [(w.category, str(w.message)) for w in our_warned] == [(w.category, str(w.message)) for w in torch_warned]
    assert our_warned, "torch warns about the deprecated arguments"


@pytest.mark.parametrize(
    "build",
    [
        lambda m: m.TripletMarginLoss(margin=0.0),
        lambda m: m.TripletMarginWithDistanceLoss(margin=-1.0),
        lambda m: m.MultiMarginLoss(p=3),
        lambda m: m.HuberLoss(delta="1"),
        lambda m: m.LinearCrossEntropyLoss(3, 4, weight=torch.ones(5)),
        lambda m: m.LinearCrossEntropyLoss(3, 4, label_smoothing=2.0),
    ],
)
def test_constructor_rejects_what_torch_rejects(build: Callable[[Any], Any]) -> None:
    with pytest.raises(Exception) as torch_exc:
        build(torch.nn)
    with pytest.raises(type(torch_exc.value)) as our_exc:
        build(rnn)
    assert str(our_exc.value) == str(torch_exc.value)


# --------------------------------------------------------------------------- client resolution


@pytest.fixture
def factory(monkeypatch: pytest.MonkeyPatch) -> list[FakeClient]:
    """Replaces client creation; returns the list of clients made, in order."""
    made: list[FakeClient] = []

    def new_client(target: str) -> FakeClient:
        made.append(FakeClient(target))
        return made[-1]

    monkeypatch.setattr(_nn_client, "_new_client", new_client)
    monkeypatch.setattr(_nn_client, "_default_client", None)
    monkeypatch.setattr(_nn_client, "_default_client_target", None)
    return made


def _mse(loss: Any) -> Any:
    return loss(torch.randn(3), torch.randn(3))


def test_default_client_is_made_lazily_from_the_environment(
    factory: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMOTELOSS_TARGET", "loss.example:6000")
    first, second = rnn.MSELoss(), rnn.L1Loss()
    assert _nn_client._default_client is None and factory == []  # nothing at construction
    _mse(first)
    _mse(second)
    _mse(first)
    assert [c.target for c in factory] == ["loss.example:6000"]
    assert _nn_client._default_client is factory[0] and len(factory[0].calls) == 3


def test_default_target_without_the_environment_variable(
    factory: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REMOTELOSS_TARGET", raising=False)
    _mse(rnn.MSELoss())
    assert [c.target for c in factory] == ["localhost:50051"]


def test_environment_is_read_at_forward_not_at_construction(
    factory: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMOTELOSS_TARGET", "early:1")
    loss = rnn.MSELoss()
    monkeypatch.setenv("REMOTELOSS_TARGET", "late:2")
    _mse(loss)
    monkeypatch.setenv("REMOTELOSS_TARGET", "later:3")
    _mse(loss)
    assert [c.target for c in factory] == ["late:2", "later:3"]


def test_target_makes_the_modules_own_client_lazily(factory: list[FakeClient]) -> None:
    loss = rnn.CrossEntropyLoss(target="own:7")
    assert factory == []
    loss(torch.randn(2, 3), torch.tensor([0, 2]))
    loss(torch.randn(2, 3), torch.tensor([0, 2]))
    assert [c.target for c in factory] == ["own:7"] and _nn_client._default_client is None


def test_explicit_client_is_used_and_nothing_else_is_made(factory: list[FakeClient]) -> None:
    fake = FakeClient()
    _mse(rnn.MSELoss(client=fake))
    assert len(fake.calls) == 1 and factory == [] and _nn_client._default_client is None


def test_client_and_target_together_are_rejected() -> None:
    with pytest.raises(TypeError, match="client= or target="):
        rnn.MSELoss(client=FakeClient(), target="x:1")


def test_async_client_is_rejected() -> None:
    class AsyncLike(FakeClient):
        async def aclose(self) -> None: ...

    with pytest.raises(TypeError, match="synchronous"):
        rnn.MSELoss(client=AsyncLike())


def test_deepcopy_shares_the_client(factory: list[FakeClient]) -> None:
    fake = FakeClient()
    loss = rnn.BCEWithLogitsLoss(pos_weight=torch.ones(3), client=fake)
    clone = copy.deepcopy(loss)
    clone(torch.randn(2, 3), torch.rand(2, 3))
    assert len(fake.calls) == 1 and factory == []
    assert clone.pos_weight is not loss.pos_weight


def test_pickle_keeps_the_target_and_state(factory: list[FakeClient]) -> None:
    loss = rnn.LinearCrossEntropyLoss(3, 4, bias=True, target="saved:9")
    _ = loss(torch.randn(2, 3), torch.tensor([1, 2]))
    restored = pickle.loads(pickle.dumps(loss))
    for key, value in loss.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)
    _ = restored(torch.randn(2, 3), torch.tensor([1, 2]))
    assert [c.target for c in factory] == ["saved:9", "saved:9"]


def test_pickle_keeps_an_explicit_clients_target_not_the_client(factory: list[FakeClient]) -> None:
    restored = pickle.loads(pickle.dumps(rnn.MSELoss(client=FakeClient("given:5"))))
    _mse(restored)
    assert [c.target for c in factory] == ["given:5"]


def test_importing_remoteloss_does_not_import_nn() -> None:
    code = "import sys, remoteloss; assert 'remoteloss.nn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
