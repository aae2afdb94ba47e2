"""The case table: generated arguments for every loss, option set, reduction and dtype.

Each loss has a generator ``gen_<loss>(g, batched, opts, reduction) -> (args, kwargs)`` that
builds torch arguments for ``torch.nn.functional.<loss>``, an ordered list of option sets
(every option torch has, alone and in the combinations that interact), and the reductions it
accepts. :func:`cases` expands the table into :class:`Case` objects:

* float64: every option set x every reduction, batched (and unbatched where the option set
  allows it);
* float32: every option set with the default reduction, plus the default options with every
  reduction;
* float16 and bfloat16: the default options with every reduction, batched.

Values are drawn in float64 from a generator seeded by the case's id and then cast, so a case
is reproducible and the same across runs. Nothing here talks to a server.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.catalog import LOSS_NAMES


# torch's CPU kernels of these losses take no float16/bfloat16: torch raises, so the server must
# answer INVALID_ARGUMENT (a server on a GPU may accept them; this suite runs on a CPU server).
CPU_NO_LOW_PRECISION = frozenset({"ctc_loss", "multilabel_margin_loss", "multi_margin_loss"})
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
OMIT = "omit"  # the reduction argument is left out (torch's default, "mean")
STD = ("none", "mean", "sum")

# Option sets for the deprecated arguments; they override `reduction`, so they run without it.
DEPRECATED: tuple[dict[str, Any], ...] = (
    {"size_average": False},
    {"reduce": False},
    {"size_average": True, "reduce": True},
    {"size_average": False, "reduce": False},
)


@dataclass(frozen=True)
class OptionSet:
    """One combination of options. `opts` mixes torch keyword arguments with generator hints."""

    name: str
    opts: Mapping[str, Any] = field(default_factory=dict)
    batched: tuple[bool, ...] = (True, False)
    reductions: tuple[str, ...] | None = None  # None: every reduction of the loss
    # None: the usual plan (see the module docstring); else only these dtypes, every reduction.
    dtypes: tuple[torch.dtype, ...] | None = None


def deprecated_sets() -> list[OptionSet]:
    sets = []
    for opts in DEPRECATED:
        name = "-".join(f"{k}={v}" for k, v in opts.items())
        sets.append(OptionSet(name, {"torch": dict(opts)}, reductions=(OMIT,)))
    return sets


class Gen:
    """Draws float64 values from a seeded generator and casts them to the case's dtype."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.rng = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype)

    def randn(self, *shape: int) -> torch.Tensor:
        return self._cast(torch.randn(shape, generator=self.rng, dtype=torch.float64))

    def uniform(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        u = torch.rand(shape, generator=self.rng, dtype=torch.float64)
        return self._cast(lo + (hi - lo) * u)

    def sign(self, *shape: int) -> torch.Tensor:
        s = torch.randint(0, 2, shape, generator=self.rng).to(torch.float64) * 2 - 1
        return self._cast(s)

    def bits(self, *shape: int) -> torch.Tensor:
        return self._cast(torch.randint(0, 2, shape, generator=self.rng).to(torch.float64))

    def classes(
        self, shape: tuple[int, ...], high: int, low: int = 0, dtype: torch.dtype = torch.int64
    ) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.rng).to(dtype)

    def log_softmax(self, *shape: int, dim: int) -> torch.Tensor:
        return self._cast(torch.randn(shape, generator=self.rng, dtype=torch.float64).log_softmax(dim))

    def softmax(self, *shape: int, dim: int) -> torch.Tensor:
        return self._cast(torch.randn(shape, generator=self.rng, dtype=torch.float64).softmax(dim))

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.rng)


Args = tuple[tuple[Any, ...], dict[str, Any]]


def _red(kwargs: dict[str, Any], reduction: str) -> dict[str, Any]:
    if reduction != OMIT:
        kwargs["reduction"] = reduction
    return kwargs


def _torch_opts(opts: Mapping[str, Any]) -> dict[str, Any]:
    return dict(opts.get("torch", {}))


# ---------------------------------------------------------------------------- generators


def _elementwise_shape(batched: bool, opts: Mapping[str, Any]) -> tuple[int, ...]:
    if opts.get("scalar"):
        return ()
    return (3, 4) if batched else (5,)


def _regression(loss: str) -> Callable[[Gen, bool, Mapping[str, Any], str], Args]:
    """l1_loss, mse_loss, huber_loss, smooth_l1_loss: input, target, optional weight."""

    def gen(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
        shape = _elementwise_shape(batched, opts)
        x = g.randn(*shape)
        tshape = shape
        if opts.get("broadcast"):  # torch warns about the size mismatch
            tshape = (shape[-1],) if batched else (1,)
        if opts.get("broadcast") == "up":  # a target of higher rank: input broadcasts up to it
            tshape = (2, *shape)
        y = g.randn(*tshape)
        kwargs = _torch_opts(opts)
        if opts.get("weight"):
            kwargs["weight"] = g.uniform(*shape, lo=0.2, hi=2.0)
        return (x, y), _red(kwargs, reduction)

    gen.__name__ = f"gen_{loss}"
    return gen


gen_l1_loss = _regression("l1_loss")
gen_mse_loss = _regression("mse_loss")
gen_huber_loss = _regression("huber_loss")
gen_smooth_l1_loss = _regression("smooth_l1_loss")


def _class_layout(batched: bool, opts: Mapping[str, Any], c: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, class-index target shape) for cross_entropy / nll_loss."""
    if opts.get("kdim"):
        return (3, c, 2, 3), (3, 2, 3)
    if batched:
        return (4, c), (4,)
    return (c,), ()


def _index_target(g: Gen, shape: tuple[int, ...], c: int, opts: Mapping[str, Any]) -> torch.Tensor:
    t = g.classes(shape, c)
    ignore = opts.get("torch", {}).get("ignore_index", -100)
    if opts.get("all_ignored"):
        return torch.full(shape, ignore, dtype=torch.int64)
    if opts.get("some_ignored"):
        flat = t.reshape(-1)
        if flat.numel() == 1:
            if opts.get("some_ignored") == "all_if_one":
                flat[0] = ignore
        else:
            flat[0] = ignore  # and make sure something else is not ignored
            if flat[1:].eq(ignore).all():
                flat[1] = (ignore + 1) % c if 0 <= ignore < c else 0
    return t


def gen_cross_entropy(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    c = 5
    ishape, tshape = _class_layout(batched, opts, c)
    x = g.randn(*ishape)
    if opts.get("prob"):
        y = g.softmax(*ishape, dim=0 if len(ishape) == 1 else 1)
    else:
        y = _index_target(g, tshape, c, opts)
    kwargs = _torch_opts(opts)
    if opts.get("weight"):
        kwargs["weight"] = g.uniform(c, lo=0.2, hi=2.0)
    return (x, y), _red(kwargs, reduction)


def gen_nll_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    c = 5
    ishape, tshape = _class_layout(batched, opts, c)
    x = g.log_softmax(*ishape, dim=0 if len(ishape) == 1 else 1)
    y = _index_target(g, tshape, c, opts)
    kwargs = _torch_opts(opts)
    if opts.get("weight"):
        kwargs["weight"] = g.uniform(c, lo=0.2, hi=2.0)
    return (x, y), _red(kwargs, reduction)


def _lengths(values: list[int], kind: str, dtype: torch.dtype, batched: bool) -> Any:
    if kind == "tuple":
        return tuple(values)
    if kind == "list":
        return list(values)
    if batched:
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values[0], dtype=dtype)  # unbatched: a 0-d tensor


def gen_ctc_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    """log_probs (T, N, C) or (T, C); padded, concatenated or unbatched targets."""
    t_len, n, c, s = 8, 3, 5, 4
    blank = opts.get("torch", {}).get("blank", 0)
    low, high = (0, c - 1) if blank == c - 1 else (1, c)
    idtype = opts.get("int_dtype", torch.int64)
    kind = opts.get("lengths", "tensor")
    if batched:
        log_probs = g.log_softmax(t_len, n, c, dim=2)
        input_lengths = [t_len, t_len - 1, t_len - 3]
        target_lengths = [s, 2, 3]
        if opts.get("impossible"):
            # Sample 1 needs 2 * 4 - 1 = 7 frames for 4 repeated labels, but gets only 5.
            input_lengths = [t_len, 5, t_len - 3]
            target_lengths = [s, 4, 3]
        targets = g.classes((n, s), high, low, dtype=idtype)
        if opts.get("impossible"):
            targets[1] = low  # the same label four times: needs a blank between repeats
        if opts.get("concatenated"):
            targets = torch.cat([targets[i, : target_lengths[i]] for i in range(n)])
    else:
        log_probs = g.log_softmax(t_len, c, dim=1)
        input_lengths = [t_len - 1]
        target_lengths = [3]
        if opts.get("impossible"):  # 4 repeated labels need 7 frames
            input_lengths = [4]
            target_lengths = [s]
        targets = g.classes((target_lengths[0],), high, low, dtype=idtype)  # (S): exactly the target
        if opts.get("impossible"):
            targets[:] = low
    il = _lengths(input_lengths, kind, idtype, batched)
    tl = _lengths(target_lengths, kind, idtype, batched)
    return (log_probs, targets, il, tl), _red(_torch_opts(opts), reduction)


def gen_poisson_nll_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (3, 4) if batched else (5,)
    kwargs = _torch_opts(opts)
    if kwargs.get("log_input", True):
        x = g.randn(*shape)
    else:
        x = g.uniform(*shape, lo=0.0, hi=3.0)
        x.view(-1)[0] = 0.0  # where eps matters
    tshape = (2, *shape) if opts.get("broadcast") == "up" else shape  # torch broadcasts input up
    y = torch.randint(0, 5, tshape, generator=g.rng).to(g.dtype)  # counts, some 0 and 1 (full)
    return (x, y), _red(kwargs, reduction)


def gen_gaussian_nll_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (3, 4) if batched else (5,)
    x = g.randn(*shape)
    y = g.randn(*shape)
    kind = opts.get("var", "same")
    if kind == "same":
        var: Any = g.uniform(*shape, lo=0.3, hi=2.0)
    elif kind == "short":  # one dimension short: homoscedastic
        var = g.uniform(*shape[:-1], lo=0.3, hi=2.0)
    elif kind == "one":  # one size-1 dimension
        var = g.uniform(*shape[:-1], 1, lo=0.3, hi=2.0)
    elif kind == "small":  # some entries below eps, clamped
        var = g.uniform(*shape, lo=0.3, hi=2.0)
        var.view(-1)[:2] = 1e-3
    else:  # a Python float
        var = 0.7
    return (x, y, var), _red(_torch_opts(opts), reduction)


def gen_kl_div(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (3, 5) if batched else (5,)
    x = g.log_softmax(*shape, dim=-1)
    kwargs = _torch_opts(opts)
    y = g.log_softmax(*shape, dim=-1) if kwargs.get("log_target") else g.softmax(*shape, dim=-1)
    return (x, y), _red(kwargs, reduction)


def gen_binary_cross_entropy(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (3, 4) if batched else (5,)
    x = g.uniform(*shape, lo=0.05, hi=0.95)
    y = g.uniform(*shape) if opts.get("soft") else g.bits(*shape)
    kwargs = _torch_opts(opts)
    if opts.get("weight") == "full":
        kwargs["weight"] = g.uniform(*shape, lo=0.2, hi=2.0)
    elif opts.get("weight") == "broadcast":
        kwargs["weight"] = g.uniform(shape[-1], lo=0.2, hi=2.0)
    return (x, y), _red(kwargs, reduction)


def gen_binary_cross_entropy_with_logits(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (3, 4) if batched else (5,)
    x = g.randn(*shape)
    y = g.uniform(*shape) if opts.get("soft") else g.bits(*shape)
    kwargs = _torch_opts(opts)
    if opts.get("weight") == "full":
        kwargs["weight"] = g.uniform(*shape, lo=0.2, hi=2.0)
    elif opts.get("weight") == "broadcast":
        kwargs["weight"] = g.uniform(shape[-1], lo=0.2, hi=2.0)
    if opts.get("pos_weight"):
        kwargs["pos_weight"] = g.uniform(shape[-1], lo=0.5, hi=3.0)
    return (x, y), _red(kwargs, reduction)


def gen_margin_ranking_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (6,) if batched else ()
    return (g.randn(*shape), g.randn(*shape), g.sign(*shape)), _red(_torch_opts(opts), reduction)


def gen_hinge_embedding_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (3, 4) if batched else (5,)
    tshape = (2, *shape) if opts.get("broadcast") == "up" else shape  # torch broadcasts input up
    return (g.randn(*shape), g.sign(*tshape)), _red(_torch_opts(opts), reduction)


def gen_multilabel_margin_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    c = 5
    rows = 3 if batched else 1
    target = torch.full((rows, c), -1, dtype=torch.int64)
    counts = {"padded": [2, 1, 4], "full": [c, c, c], "empty": [0, 2, 0]}[opts.get("labels", "padded")]
    for r in range(rows):
        k = counts[r]
        target[r, :k] = g.perm(c)[:k]
        if opts.get("garbage_after_pad") and k < c - 1:
            target[r, k + 1] = 0  # after the first -1 everything is ignored
    x = g.randn(rows, c)
    if not batched:
        x, target = x[0], target[0]
    return (x, target), _red(_torch_opts(opts), reduction)


def gen_soft_margin_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (3, 4) if batched else (5,)
    return (g.randn(*shape), g.sign(*shape)), _red(_torch_opts(opts), reduction)


def gen_multilabel_soft_margin_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    c = 4
    shape = (3, c) if batched else (c,)
    kwargs = _torch_opts(opts)
    if opts.get("weight"):
        kwargs["weight"] = g.uniform(c, lo=0.2, hi=2.0)
    return (g.randn(*shape), g.bits(*shape)), _red(kwargs, reduction)


def gen_cosine_embedding_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    n, d = 4, 3
    shape = (n, d) if batched else (d,)
    target = g.sign(n) if batched else g.sign()
    return (g.randn(*shape), g.randn(*shape), target), _red(_torch_opts(opts), reduction)


def gen_multi_margin_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    c = 5
    x = g.randn(4, c) if batched else g.randn(c)
    y = g.classes((4,) if batched else (), c)
    kwargs = _torch_opts(opts)
    if opts.get("weight"):
        kwargs["weight"] = g.uniform(c, lo=0.2, hi=2.0)
    return (x, y), _red(kwargs, reduction)


def gen_triplet_margin_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (4, 3) if batched else (3,)
    return (g.randn(*shape), g.randn(*shape), g.randn(*shape)), _red(_torch_opts(opts), reduction)


@dataclass(frozen=True)
class RemoteOnly:
    """A value whose remote spelling differs from the local one (remoteloss.CosineDistance())."""

    local: Any
    remote: Callable[[], Any]


def _cosine_distance(dim: int, eps: float | None) -> RemoteOnly:
    def local(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(x1, x2, dim=dim, eps=1e-8 if eps is None else eps)

    def remote() -> Any:
        import remoteloss

        kwargs: dict[str, Any] = {"dim": dim}
        if eps is not None:
            kwargs["eps"] = eps
        return remoteloss.CosineDistance(**kwargs)

    return RemoteOnly(local, remote)


def _remoteloss_pairwise(p: float, eps: float) -> RemoteOnly:
    def remote() -> Any:
        import remoteloss

        return remoteloss.PairwiseDistance(p=p, eps=eps)

    return RemoteOnly(nn.PairwiseDistance(p=p, eps=eps), remote)


def gen_triplet_margin_with_distance_loss(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    shape = (4, 3) if batched else (3,)
    kwargs = _torch_opts(opts)
    dist = opts.get("distance")
    if dist == "pairwise_p1":
        kwargs["distance_function"] = nn.PairwiseDistance(p=1)
    elif dist == "pairwise_inf":
        kwargs["distance_function"] = nn.PairwiseDistance(p=math.inf)
    elif dist == "pairwise_eps_keepdim":
        kwargs["distance_function"] = nn.PairwiseDistance(p=3.0, eps=1e-3, keepdim=True)
    elif dist == "functional":
        kwargs["distance_function"] = F.pairwise_distance
    elif dist == "remoteloss_pairwise":
        kwargs["distance_function"] = _remoteloss_pairwise(p=1.5, eps=1e-4)
    elif dist == "cosine":
        kwargs["distance_function"] = _cosine_distance(1 if batched else 0, None)
    elif dist == "cosine_opts":
        kwargs["distance_function"] = _cosine_distance(-1, 1e-4)
    return (g.randn(*shape), g.randn(*shape), g.randn(*shape)), _red(kwargs, reduction)


def gen_linear_cross_entropy(g: Gen, batched: bool, opts: Mapping[str, Any], reduction: str) -> Args:
    n, in_features, c = 6, 3, 5
    kdim = opts.get("kdim")
    x = g.randn(n, in_features) if batched else g.randn(in_features)
    out = (2,) if kdim else ()
    lw = g.randn(c, *out, in_features)
    kwargs = _torch_opts(opts)
    if opts.get("prob"):
        lshape = (n, c, *out) if batched else (c,)
        y = g.softmax(*lshape, dim=1 if batched else 0)
    else:
        tshape = (n, *out) if batched else ()
        y = g.classes(tshape, c)
        ignore = kwargs.get("ignore_index")
        ignore = -100 if ignore is None else ignore  # torch maps None to -100 for class indices
        if opts.get("some_ignored") and y.numel() > 1:
            y.view(-1)[0] = ignore
            y.view(-1)[2] = ignore
    if opts.get("bias"):
        kwargs["linear_bias"] = g.randn(c, *out)
    if opts.get("weight"):
        kwargs["weight"] = g.uniform(c, lo=0.2, hi=2.0)
    if "options" in opts:
        kwargs["options"] = nn.LinearCrossEntropyOptions(**opts["options"])
    return (x, lw, y), _red(kwargs, reduction)


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LossTable:
    name: str
    generate: Callable[[Gen, bool, Mapping[str, Any], str], Args]
    option_sets: tuple[OptionSet, ...]
    reductions: tuple[str, ...] = STD
    arg_names: tuple[str, ...] = ("input", "target")


def _sets(*sets: OptionSet, deprecated: bool = True) -> tuple[OptionSet, ...]:
    base = (OptionSet("default"), *sets)
    return base + (tuple(deprecated_sets()) if deprecated else ())


def _t(**torch_kwargs: Any) -> dict[str, Any]:
    return {"torch": torch_kwargs}


_REGRESSION_SETS = (
    OptionSet("weight", {"weight": "full"}),
    OptionSet("target_broadcast", {"broadcast": True}),
    OptionSet("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
    OptionSet("scalar", {"scalar": True}, batched=(True,)),
)

TABLE: dict[str, LossTable] = {
    t.name: t
    for t in (
        LossTable("l1_loss", gen_l1_loss, _sets(*_REGRESSION_SETS)),
        LossTable("mse_loss", gen_mse_loss, _sets(*_REGRESSION_SETS)),
        LossTable(
            "cross_entropy",
            gen_cross_entropy,
            _sets(
                OptionSet("weight", {"weight": True}),
                OptionSet("ignore_default", {"some_ignored": True}, batched=(True,)),
                OptionSet("ignore_index", {**_t(ignore_index=1), "some_ignored": True}),
                OptionSet("weight_ignore", {**_t(ignore_index=2), "weight": True, "some_ignored": True}),
                OptionSet("label_smoothing", _t(label_smoothing=0.2)),
                OptionSet(
                    "smoothing_weight_ignore",
                    {**_t(label_smoothing=0.3, ignore_index=0), "weight": True, "some_ignored": True},
                    batched=(True,),
                ),
                OptionSet("all_ignored", {**_t(ignore_index=3), "all_ignored": True}, batched=(True,)),
                OptionSet("prob", {"prob": True}),
                OptionSet("prob_weight", {"prob": True, "weight": True}),
                OptionSet("prob_smoothing", {**_t(label_smoothing=0.1), "prob": True}),
                OptionSet("prob_weight_smoothing", {**_t(label_smoothing=0.25), "prob": True, "weight": True}),
                OptionSet("kdim", {"kdim": True}, batched=(True,)),
                OptionSet(
                    "kdim_weight_ignore",
                    {**_t(ignore_index=4, label_smoothing=0.1), "kdim": True, "weight": True, "some_ignored": True},
                    batched=(True,),
                ),
                OptionSet("kdim_prob_weight", {"kdim": True, "prob": True, "weight": True}, batched=(True,)),
            ),
        ),
        LossTable(
            "ctc_loss",
            gen_ctc_loss,
            _sets(
                OptionSet("lengths_tuple", {"lengths": "tuple"}),
                OptionSet("lengths_list", {"lengths": "list"}, batched=(True,)),
                OptionSet("concatenated", {"concatenated": True}, batched=(True,)),
                OptionSet("concatenated_tuple", {"concatenated": True, "lengths": "tuple"}, batched=(True,)),
                OptionSet("int32", {"int_dtype": torch.int32}),
                OptionSet("int32_concatenated", {"int_dtype": torch.int32, "concatenated": True}, batched=(True,)),
                OptionSet("blank_last", _t(blank=4)),
                OptionSet("impossible", {"impossible": True}),
                OptionSet("zero_infinity", {**_t(zero_infinity=True), "impossible": True}),
                OptionSet("zero_infinity_possible", _t(zero_infinity=True), batched=(True,)),
                deprecated=False,
            ),
            arg_names=("log_probs", "targets", "input_lengths", "target_lengths"),
        ),
        LossTable(
            "nll_loss",
            gen_nll_loss,
            _sets(
                OptionSet("weight", {"weight": True}),
                OptionSet("ignore_default", {"some_ignored": True}, batched=(True,)),
                OptionSet("ignore_index", {**_t(ignore_index=1), "some_ignored": True}),
                OptionSet("weight_ignore", {**_t(ignore_index=2), "weight": True, "some_ignored": True}),
                OptionSet("all_ignored", {**_t(ignore_index=3), "all_ignored": True}, batched=(True,)),
                OptionSet("kdim", {"kdim": True}, batched=(True,)),
                OptionSet(
                    "kdim_weight_ignore",
                    {**_t(ignore_index=0), "kdim": True, "weight": True, "some_ignored": True},
                    batched=(True,),
                ),
            ),
        ),
        LossTable(
            "poisson_nll_loss",
            gen_poisson_nll_loss,
            _sets(
                OptionSet("full", _t(full=True)),
                OptionSet("linear", _t(log_input=False)),
                OptionSet("linear_eps", _t(log_input=False, eps=0.1)),
                OptionSet("linear_full", _t(log_input=False, full=True)),
                OptionSet("log_eps_unused", _t(log_input=True, eps=0.5, full=True)),
                OptionSet("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
            ),
        ),
        LossTable(
            "gaussian_nll_loss",
            gen_gaussian_nll_loss,
            _sets(
                OptionSet("var_short", {"var": "short"}, batched=(True,)),
                OptionSet("var_size_one", {"var": "one"}),
                OptionSet("var_float", {"var": "float"}),
                OptionSet("full", _t(full=True)),
                OptionSet("eps", {**_t(eps=0.01), "var": "small"}),
                OptionSet("full_eps_short", {**_t(full=True, eps=0.5), "var": "short"}, batched=(True,)),
                deprecated=False,
            ),
            arg_names=("input", "target", "var"),
        ),
        LossTable(
            "kl_div",
            gen_kl_div,
            _sets(OptionSet("log_target", _t(log_target=True))),
            reductions=("none", "mean", "sum", "batchmean"),
        ),
        LossTable(
            "binary_cross_entropy",
            gen_binary_cross_entropy,
            _sets(
                OptionSet("soft_target", {"soft": True}),
                OptionSet("weight", {"weight": "full"}),
                OptionSet("weight_broadcast", {"weight": "broadcast", "soft": True}, batched=(True,)),
            ),
        ),
        LossTable(
            "binary_cross_entropy_with_logits",
            gen_binary_cross_entropy_with_logits,
            _sets(
                OptionSet("soft_target", {"soft": True}),
                OptionSet("weight", {"weight": "full"}),
                OptionSet("weight_broadcast", {"weight": "broadcast"}, batched=(True,)),
                OptionSet("pos_weight", {"pos_weight": True, "soft": True}),
                OptionSet("weight_pos_weight", {"weight": "full", "pos_weight": True}),
            ),
        ),
        LossTable(
            "margin_ranking_loss",
            gen_margin_ranking_loss,
            _sets(OptionSet("margin", _t(margin=0.5)), OptionSet("margin_negative", _t(margin=-0.3))),
            arg_names=("input1", "input2", "target"),
        ),
        LossTable(
            "hinge_embedding_loss",
            gen_hinge_embedding_loss,
            _sets(
                OptionSet("margin", _t(margin=0.5)),
                OptionSet("margin_large", _t(margin=2.0)),
                OptionSet("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
            ),
        ),
        LossTable(
            "multilabel_margin_loss",
            gen_multilabel_margin_loss,
            _sets(
                OptionSet("all_labels", {"labels": "full"}, batched=(True,)),
                OptionSet("some_empty", {"labels": "empty"}, batched=(True,)),
                OptionSet("after_padding", {"garbage_after_pad": True}),
            ),
        ),
        LossTable(
            "huber_loss",
            gen_huber_loss,
            _sets(
                OptionSet("delta_small", _t(delta=0.5)),
                OptionSet("delta_large", _t(delta=2.0)),
                OptionSet("weight", {"weight": "full"}),
                OptionSet("weight_delta", {**_t(delta=0.3), "weight": "full"}, batched=(True,)),
                OptionSet("target_broadcast", {"broadcast": True}),
                OptionSet("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
                deprecated=False,
            ),
        ),
        LossTable(
            "smooth_l1_loss",
            gen_smooth_l1_loss,
            _sets(
                OptionSet("beta_zero", _t(beta=0.0)),
                OptionSet("beta_small", _t(beta=0.5)),
                OptionSet("beta_large", _t(beta=2.0)),
                OptionSet("target_broadcast", {"broadcast": True}),
                OptionSet("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
            ),
        ),
        LossTable("soft_margin_loss", gen_soft_margin_loss, _sets()),
        LossTable(
            "multilabel_soft_margin_loss",
            gen_multilabel_soft_margin_loss,
            _sets(OptionSet("weight", {"weight": True})),
        ),
        LossTable(
            "cosine_embedding_loss",
            gen_cosine_embedding_loss,
            _sets(OptionSet("margin", _t(margin=0.5)), OptionSet("margin_negative", _t(margin=-0.5))),
            arg_names=("input1", "input2", "target"),
        ),
        LossTable(
            "multi_margin_loss",
            gen_multi_margin_loss,
            _sets(
                OptionSet("p2", _t(p=2)),
                OptionSet("margin", _t(margin=0.5)),
                OptionSet("weight", {"weight": True}),
                OptionSet("p2_margin_weight", {**_t(p=2, margin=2.0), "weight": True}),
            ),
        ),
        LossTable(
            "triplet_margin_loss",
            gen_triplet_margin_loss,
            _sets(
                OptionSet("margin", _t(margin=0.5)),
                OptionSet("p1", _t(p=1)),
                OptionSet("p3", _t(p=3.0)),
                OptionSet("eps", _t(eps=0.1)),
                OptionSet("swap", _t(swap=True)),
                OptionSet("all", _t(margin=2.0, p=1.5, eps=1e-3, swap=True)),
            ),
            arg_names=("anchor", "positive", "negative"),
        ),
        LossTable(
            "triplet_margin_with_distance_loss",
            gen_triplet_margin_with_distance_loss,
            _sets(
                OptionSet("pairwise_p1", {"distance": "pairwise_p1"}),
                OptionSet("pairwise_inf", {"distance": "pairwise_inf"}),
                OptionSet("pairwise_eps_keepdim", {"distance": "pairwise_eps_keepdim"}, batched=(True,)),
                OptionSet("functional", {"distance": "functional"}),
                OptionSet("remoteloss_pairwise", {"distance": "remoteloss_pairwise"}),
                OptionSet("cosine", {"distance": "cosine"}),
                OptionSet("cosine_opts", {"distance": "cosine_opts"}),
                OptionSet("margin", _t(margin=0.3)),
                OptionSet("swap", _t(swap=True)),
                OptionSet("cosine_swap_margin", {**_t(swap=True, margin=1.5), "distance": "cosine"}),
                deprecated=False,
            ),
            arg_names=("anchor", "positive", "negative"),
        ),
        LossTable(
            "linear_cross_entropy",
            gen_linear_cross_entropy,
            _sets(
                OptionSet("bias", {"bias": True}),
                OptionSet("weight", {"weight": True}),
                OptionSet("ignore_default", {"some_ignored": True}, batched=(True,)),
                OptionSet("ignore_none", {**_t(ignore_index=None), "some_ignored": True}, batched=(True,)),
                OptionSet(
                    "ignore_index", {**_t(ignore_index=1), "some_ignored": True, "weight": True}, batched=(True,)
                ),
                OptionSet("label_smoothing", {**_t(label_smoothing=0.2), "bias": True}),
                OptionSet("prob", {"prob": True}),
                OptionSet(
                    "prob_bias_weight_smoothing",
                    {**_t(label_smoothing=0.1), "prob": True, "bias": True, "weight": True},
                ),
                OptionSet("kdim", {"kdim": True, "bias": True}, batched=(True,)),
                OptionSet("kdim_prob", {"kdim": True, "prob": True}, batched=(True,)),
                OptionSet("options_default", {"options": {}}),
                OptionSet(
                    "options_bias_weight_ignore",
                    {"options": {}, "bias": True, "weight": True, "some_ignored": True},
                    batched=(True,),
                ),
                OptionSet(
                    "options_chunk_size", {"options": {"batch_chunk_size": 2, "chunking_method": None}, "bias": True}
                ),
                OptionSet("options_chunk_size_auto", {"options": {"batch_chunk_size": 4}}, batched=(True,)),
                OptionSet("options_aspect_ratio", {"options": {"chunking_method": "aspect_ratio:2"}}, batched=(True,)),
                OptionSet("options_accurate", {"options": {"acc_policy": "accurate"}}, batched=(True,)),
                OptionSet("options_balanced", {"options": {"acc_policy": "balanced"}, "weight": True}, batched=(True,)),
                OptionSet(
                    "options_compact",
                    {"options": {"acc_policy": "compact", "allow_retain_graph": True}},
                    batched=(True,),
                ),
                OptionSet("options_smoothing_fallback", {**_t(label_smoothing=0.1), "options": {}}),
                OptionSet("options_prob_fallback", {"options": {}, "prob": True}, batched=(True,)),
                OptionSet("options_kdim_fallback", {"options": {}, "kdim": True}, batched=(True,)),
                OptionSet(
                    "options_low_precision", {"options": {}, "bias": True}, batched=(True,), dtypes=LOW_PRECISION
                ),
                OptionSet(
                    "options_acc_dtype",
                    {"options": {"acc_dtype": torch.float32, "acc_policy": "balanced"}},
                    batched=(True,),
                    dtypes=LOW_PRECISION,
                ),
                deprecated=False,
            ),
            arg_names=("input", "linear_weight", "target"),
        ),
    )
}
assert tuple(TABLE) == LOSS_NAMES


# ---------------------------------------------------------------------------- cases


@dataclass
class Call:
    """The built arguments of one case."""

    loss: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    arg_names: tuple[str, ...]

    def local_kwargs(self) -> dict[str, Any]:
        return {k: (v.local if isinstance(v, RemoteOnly) else v) for k, v in self.kwargs.items()}

    def remote_kwargs(self) -> dict[str, Any]:
        return {k: (v.remote() if isinstance(v, RemoteOnly) else v) for k, v in self.kwargs.items()}

    def local(self) -> Any:
        return getattr(F, self.loss)(*self.args, **self.local_kwargs())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor argument by torch's name."""
        named = dict(zip(self.arg_names, self.args, strict=True))
        named.update(self.kwargs)
        return {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}

    def replace(self, values: Mapping[str, Any]) -> Call:
        """A copy with some arguments (by name) replaced."""
        args = tuple(values.get(n, a) for n, a in zip(self.arg_names, self.args, strict=True))
        kwargs = {k: values.get(k, v) for k, v in self.kwargs.items()}
        return Call(self.loss, args, kwargs, self.arg_names)


@dataclass(frozen=True)
class Case:
    loss: str
    dtype: torch.dtype
    batched: bool
    option_set: OptionSet
    reduction: str  # or OMIT

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.loss}-{dt}-{'batched' if self.batched else 'unbatched'}-{self.option_set.name}-{self.reduction}"

    @property
    def torch_raises(self) -> bool:
        """Whether torch itself rejects this case on the CPU (see CPU_NO_LOW_PRECISION)."""
        return self.dtype in LOW_PRECISION and self.loss in CPU_NO_LOW_PRECISION

    @property
    def scalar_output(self) -> bool:
        """Whether the loss is a scalar whatever the shapes (a reducing reduction)."""
        deprecated = self.option_set.opts.get("torch", {})
        if "size_average" in deprecated or "reduce" in deprecated:
            return deprecated.get("reduce", True) is not False
        return self.reduction != "none"

    def build(self) -> Call:
        table = TABLE[self.loss]
        g = Gen(zlib.crc32(self.id.encode()), self.dtype)
        args, kwargs = table.generate(g, self.batched, self.option_set.opts, self.reduction)
        return Call(self.loss, args, kwargs, table.arg_names[: len(args)])


def _reductions(table: LossTable, option_set: OptionSet) -> tuple[str, ...]:
    if option_set.reductions is not None:
        return option_set.reductions
    if option_set.name == "default":
        return (*table.reductions, OMIT)
    return table.reductions


def cases(loss: str | None = None) -> Iterator[Case]:
    """Every case of the table (of one loss, if given), float64 first."""
    for table in TABLE.values():
        if loss is not None and table.name != loss:
            continue
        default = table.option_sets[0]
        planned = [o for o in table.option_sets if o.dtypes is None]
        for option_set in planned:  # float64: everything
            for batched in option_set.batched:
                for reduction in _reductions(table, option_set):
                    yield Case(table.name, torch.float64, batched, option_set, reduction)
        for option_set in planned:  # float32: every option set once, every reduction once
            if option_set is default:
                reductions = _reductions(table, option_set)
            else:
                options = _reductions(table, option_set)
                reductions = ("mean",) if "mean" in options else options[:1]
            for reduction in reductions:
                yield Case(table.name, torch.float32, option_set.batched[0], option_set, reduction)
        for dtype in LOW_PRECISION:  # the default options, every reduction
            for reduction in table.reductions:
                yield Case(table.name, dtype, True, default, reduction)
        for option_set in table.option_sets:  # option sets for particular dtypes
            for dtype in option_set.dtypes or ():
                for reduction in _reductions(table, option_set):
                    yield Case(table.name, dtype, option_set.batched[0], option_set, reduction)


def all_cases() -> list[Case]:
    return list(cases())


TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-9},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-2, "atol": 1e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float64])


def with_grad(call: Call, names: tuple[str, ...] | list[str]) -> tuple[Call, dict[str, torch.Tensor]]:
    """A copy of `call` whose named tensors are fresh leaves that require grad."""
    leaves = {n: call.tensors()[n].detach().clone().requires_grad_() for n in names}
    return call.replace(leaves), leaves


def probe(call: Call) -> dict[str, str]:
    """How torch treats requires_grad on each tensor argument, set one at a time.

    "yes": backward leaves a gradient on it; "raises": torch refuses it (in forward or backward);
    "unused": torch accepts it, but the loss does not depend on it through autograd (the gradient
    stays None); "integer": an integer tensor, which cannot require grad at all.
    """
    found: dict[str, str] = {}
    for name, tensor in call.tensors().items():
        if not tensor.is_floating_point():
            found[name] = "integer"
            continue
        attempt, leaves = with_grad(call, (name,))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = attempt.local()
                if out.requires_grad:
                    out.sum().backward()
        except (RuntimeError, NotImplementedError):
            found[name] = "raises"
            continue
        found[name] = "yes" if leaves[name].grad is not None else "unused"
    return found


def differentiable(call: Call) -> tuple[str, ...]:
    """The tensor arguments torch differentiates the loss for (see :func:`probe`)."""
    return tuple(name for name, kind in probe(call).items() if kind == "yes")
