"""The Examples of every torch.nn loss class (torch 2.13, torch/nn/modules/loss.py), run remotely.

Each example is copied unchanged, except that the loss classes come from ``nn``: torch.nn for
the reference run, and for the remote run a namespace where ``nn.X(...)`` is
``remoteloss.nn.X(..., client=client)`` and everything else (LogSoftmax, Conv2d, Embedding,
PairwiseDistance, Sigmoid) is still torch.nn's. Both runs start from the same seed, so they
draw the same tensors and parameters; their outputs and every ``.grad`` must agree.

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
# Each takes `nn` and `rec`; `rec(name=value, ...)` keeps results to compare (a leaf's .grad too).


def example_l1(nn: Any, rec: Record) -> None:
    loss = nn.L1Loss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5)
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_nll(nn: Any, rec: Record) -> None:
    log_softmax = nn.LogSoftmax(dim=1)
    loss_fn = nn.NLLLoss()
    # input to NLLLoss is of size N x C = 3 x 5
    input = torch.randn(3, 5, requires_grad=True)
    # each element in target must have 0 <= value < C
    target = torch.tensor([1, 0, 4])
    loss = loss_fn(log_softmax(input), target)
    loss.backward()
    rec(loss=loss, input=input)

    # 2D loss example (used, for example, with image inputs)
    N, C = 5, 4
    loss_fn = nn.NLLLoss()
    data = torch.randn(N, 16, 10, 10)
    conv = nn.Conv2d(16, C, (3, 3))
    log_softmax = nn.LogSoftmax(dim=1)
    # output of conv forward is of shape [N, C, 8, 8]
    output = log_softmax(conv(data))
    # each element in target must have 0 <= value < C
    target = torch.empty(N, 8, 8, dtype=torch.long).random_(0, C)
    # input to NLLLoss is of size N x C x height (8) x width (8)
    loss = loss_fn(output, target)
    loss.backward()
    rec(loss_2d=loss, conv_weight=conv.weight, conv_bias=conv.bias)


def example_poisson_nll(nn: Any, rec: Record) -> None:
    loss = nn.PoissonNLLLoss()
    log_input = torch.randn(5, 2, requires_grad=True)
    target = torch.randn(5, 2)
    output = loss(log_input, target)
    output.backward()
    rec(output=output, log_input=log_input)


def example_gaussian_nll(nn: Any, rec: Record) -> None:
    loss = nn.GaussianNLLLoss()
    input = torch.randn(5, 2, requires_grad=True)
    target = torch.randn(5, 2)
    var = torch.ones(5, 2, requires_grad=True)  # heteroscedastic
    output = loss(input, target, var)
    output.backward()
    rec(output=output, input=input, var=var)

    loss = nn.GaussianNLLLoss()
    input = torch.randn(5, 2, requires_grad=True)
    target = torch.randn(5, 2)
    var = torch.ones(5, 1, requires_grad=True)  # homoscedastic
    output = loss(input, target, var)
    output.backward()
    rec(output_homoscedastic=output, input_homoscedastic=input, var_homoscedastic=var)


def example_kl_div(nn: Any, rec: Record) -> None:
    kl_loss = nn.KLDivLoss(reduction="batchmean")
    # input should be a distribution in the log space
    input = F.log_softmax(torch.randn(3, 5, requires_grad=True), dim=1)
    # Sample a batch of distributions. Usually this would come from the dataset
    target = F.softmax(torch.rand(3, 5), dim=1)
    output = kl_loss(input, target)
    rec(output=output)

    kl_loss = nn.KLDivLoss(reduction="batchmean", log_target=True)
    log_target = F.log_softmax(torch.rand(3, 5), dim=1)
    output = kl_loss(input, log_target)
    rec(output_log_target=output)


def example_mse(nn: Any, rec: Record) -> None:
    loss = nn.MSELoss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5)
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_bce(nn: Any, rec: Record) -> None:
    m = nn.Sigmoid()
    loss = nn.BCELoss()
    input = torch.randn(3, 2, requires_grad=True)
    target = torch.rand(3, 2, requires_grad=False)
    output = loss(m(input), target)
    output.backward()
    rec(output=output, input=input)


def example_bce_with_logits(nn: Any, rec: Record) -> None:
    # (the docs spell the class torch.nn.BCEWithLogitsLoss here)
    target = torch.ones([10, 64], dtype=torch.float32)  # 64 classes, batch size = 10
    output = torch.full([10, 64], 1.5)  # A prediction (logit)
    pos_weight = torch.ones([64])  # All weights are equal to 1
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    rec(criterion=criterion(output, target))  # -log(sigmoid(1.5))

    loss = nn.BCEWithLogitsLoss()
    input = torch.randn(3, requires_grad=True)
    target = torch.empty(3).random_(2)
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_hinge_embedding(nn: Any, rec: Record) -> None:
    loss = nn.HingeEmbeddingLoss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5).sign()
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_multilabel_margin(nn: Any, rec: Record) -> None:
    loss = nn.MultiLabelMarginLoss()
    x = torch.FloatTensor([[0.1, 0.2, 0.4, 0.8]])
    # for target y, only consider labels 3 and 0, not after label -1
    y = torch.LongTensor([[3, 0, -1, 1]])
    # 0.25 * ((1-(0.1-0.2)) + (1-(0.1-0.4)) + (1-(0.8-0.2)) + (1-(0.8-0.4)))
    rec(value=loss(x, y))


def example_smooth_l1(nn: Any, rec: Record) -> None:
    loss = nn.SmoothL1Loss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5)
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_huber(nn: Any, rec: Record) -> None:
    loss = nn.HuberLoss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5)
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_soft_margin(nn: Any, rec: Record) -> None:
    loss = nn.SoftMarginLoss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5).sign()
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_cross_entropy(nn: Any, rec: Record) -> None:
    # Example of target with class indices
    loss = nn.CrossEntropyLoss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.empty(3, dtype=torch.long).random_(5)
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)

    # Example of target with class probabilities
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5).softmax(dim=1)
    output = loss(input, target)
    output.backward()
    rec(output_prob=output, input_prob=input)


def example_cross_entropy_bad_probabilities(nn: Any, rec: Record) -> None:
    # Example of target with incorrectly specified class probabilities
    loss = nn.CrossEntropyLoss()
    torch.manual_seed(283)
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5)
    # No error message and possible misleading loss value
    rec(item=torch.tensor(loss(input, target).item()))

    # Example of target with correctly specified class probabilities
    # Use .softmax() to ensure true probability distribution
    target_new = target.softmax(dim=1)
    rec(item_new=torch.tensor(loss(input, target_new).item()))


def example_linear_cross_entropy(nn: Any, rec: Record) -> None:
    torch.manual_seed(283)
    # Example of target with class indices
    loss = nn.LinearCrossEntropyLoss(5, 10, out_features=(4, 3))
    input = torch.randn(2, 5, requires_grad=True)
    target = torch.randint(0, 10, (2, 4, 3))
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)

    # Example of target with class probabilities
    input = torch.randn(2, 5, requires_grad=True)
    target = torch.randn(2, 10, 4, 3).softmax(dim=1)
    output = loss(input, target)
    output.backward()
    rec(output_prob=output, input_prob=input, linear_weight=loss.linear.weight)


def example_multilabel_soft_margin(nn: Any, rec: Record) -> None:
    loss = nn.MultiLabelSoftMarginLoss()
    input = torch.randn(3, 5, requires_grad=True)
    target = torch.empty(3, 5).random_(2)
    output = loss(input, target)
    output.backward()
    rec(output=output, input=input)


def example_cosine_embedding(nn: Any, rec: Record) -> None:
    loss = nn.CosineEmbeddingLoss()
    input1 = torch.randn(3, 5, requires_grad=True)
    input2 = torch.randn(3, 5, requires_grad=True)
    target = torch.ones(3)
    output = loss(input1, input2, target)
    output.backward()
    rec(output=output, input1=input1, input2=input2)


def example_margin_ranking(nn: Any, rec: Record) -> None:
    loss = nn.MarginRankingLoss()
    input1 = torch.randn(3, requires_grad=True)
    input2 = torch.randn(3, requires_grad=True)
    target = torch.randn(3).sign()
    output = loss(input1, input2, target)
    output.backward()
    rec(output=output, input1=input1, input2=input2)


def example_multi_margin(nn: Any, rec: Record) -> None:
    loss = nn.MultiMarginLoss()
    x = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
    y = torch.tensor([3])
    # 0.25 * ((1-(0.8-0.1)) + (1-(0.8-0.2)) + (1-(0.8-0.4)))
    rec(value=loss(x, y))


def example_triplet_margin(nn: Any, rec: Record) -> None:
    triplet_loss = nn.TripletMarginLoss(margin=1.0, p=2, eps=1e-7)
    anchor = torch.randn(100, 128, requires_grad=True)
    positive = torch.randn(100, 128, requires_grad=True)
    negative = torch.randn(100, 128, requires_grad=True)
    output = triplet_loss(anchor, positive, negative)
    output.backward()
    rec(output=output, anchor=anchor, positive=positive, negative=negative)


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


def example_ctc(nn: Any, rec: Record) -> None:
    # Target are to be padded
    T = 50  # Input sequence length
    C = 20  # Number of classes (including blank)
    N = 16  # Batch size
    S = 30  # Target sequence length of longest target in batch (padding length)
    S_min = 10  # Minimum target length, for demonstration purposes

    # Initialize random batch of input vectors, for *size = (T,N,C)
    input = torch.randn(T, N, C).log_softmax(2).detach().requires_grad_()

    # Initialize random batch of targets (0 = blank, 1:C = classes)
    target = torch.randint(low=1, high=C, size=(N, S), dtype=torch.long)

    input_lengths = torch.full(size=(N,), fill_value=T, dtype=torch.long)
    target_lengths = torch.randint(
        low=S_min,
        high=S,
        size=(N,),
        dtype=torch.long,
    )
    ctc_loss = nn.CTCLoss()
    loss = ctc_loss(input, target, input_lengths, target_lengths)
    loss.backward()
    rec(padded=loss, padded_input=input)

    # Target are to be un-padded
    T = 50  # Input sequence length
    C = 20  # Number of classes (including blank)
    N = 16  # Batch size

    # Initialize random batch of input vectors, for *size = (T,N,C)
    input = torch.randn(T, N, C).log_softmax(2).detach().requires_grad_()
    input_lengths = torch.full(size=(N,), fill_value=T, dtype=torch.long)

    # Initialize random batch of targets (0 = blank, 1:C = classes)
    target_lengths = torch.randint(low=1, high=T, size=(N,), dtype=torch.long)
    target = torch.randint(
        low=1,
        high=C,
        size=(sum(target_lengths),),
        dtype=torch.long,
    )
    ctc_loss = nn.CTCLoss()
    loss = ctc_loss(input, target, input_lengths, target_lengths)
    loss.backward()
    rec(unpadded=loss, unpadded_input=input)

    # Target are to be un-padded and unbatched (effectively N=1)
    T = 50  # Input sequence length
    C = 20  # Number of classes (including blank)

    # Initialize random batch of input vectors, for *size = (T,C)
    input = torch.randn(T, C).log_softmax(1).detach().requires_grad_()
    input_lengths = torch.tensor(T, dtype=torch.long)

    # Initialize random batch of targets (0 = blank, 1:C = classes)
    target_lengths = torch.randint(low=1, high=T, size=(), dtype=torch.long)
    target = torch.randint(
        low=1,
        high=C,
        size=(target_lengths,),
        dtype=torch.long,
    )
    ctc_loss = nn.CTCLoss()
    loss = ctc_loss(input, target, input_lengths, target_lengths)
    loss.backward()
    rec(unbatched=loss, unbatched_input=input)


EXAMPLES: dict[str, Callable[[Any, Record], None]] = {
    "L1Loss": example_l1,
    "NLLLoss": example_nll,
    "PoissonNLLLoss": example_poisson_nll,
    "GaussianNLLLoss": example_gaussian_nll,
    "KLDivLoss": example_kl_div,
    "MSELoss": example_mse,
    "BCELoss": example_bce,
    "BCEWithLogitsLoss": example_bce_with_logits,
    "HingeEmbeddingLoss": example_hinge_embedding,
    "MultiLabelMarginLoss": example_multilabel_margin,
    "SmoothL1Loss": example_smooth_l1,
    "HuberLoss": example_huber,
    "SoftMarginLoss": example_soft_margin,
    "CrossEntropyLoss": example_cross_entropy,
    "CrossEntropyLoss-bad-probabilities": example_cross_entropy_bad_probabilities,
    "LinearCrossEntropyLoss": example_linear_cross_entropy,
    "MultiLabelSoftMarginLoss": example_multilabel_soft_margin,
    "CosineEmbeddingLoss": example_cosine_embedding,
    "MarginRankingLoss": example_margin_ranking,
    "MultiMarginLoss": example_multi_margin,
    "TripletMarginLoss": example_triplet_margin,
    "TripletMarginWithDistanceLoss": example_triplet_margin_with_distance,
    "CTCLoss": example_ctc,
}


def _run(example: Callable[[Any, Record], None], nn: Any) -> dict[str, torch.Tensor]:
    recorded: dict[str, torch.Tensor] = {}

    def rec(**values: torch.Tensor) -> None:
        for name, value in values.items():
            recorded[name] = value

    torch.manual_seed(0)
    example(nn, rec)
    return recorded


def _compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        torch.testing.assert_close(got.detach(), want.detach(), msg=lambda m, n=name: f"{n}: {m}")
        if want.is_leaf and want.requires_grad:
            assert want.grad is not None
            assert got.grad is not None, f"{name}.grad is None"
            torch.testing.assert_close(got.grad, want.grad, msg=lambda m, n=name: f"{n}.grad: {m}")


def test_every_loss_class_has_an_example() -> None:
    import remoteloss.nn as rnn

    covered = {name.split("-")[0] for name in EXAMPLES}
    assert covered == set(rnn.__all__)


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
