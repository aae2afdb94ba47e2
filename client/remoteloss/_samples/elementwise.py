"""Sample entries of the element-wise losses: input and target of one shape (or broadcast)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from remoteloss._samples.base import Draw, Entry, Options, Shape, options, t, torch_options

__all__ = ["ENTRIES"]


def _last(s: Shape) -> int:
    if not s:
        raise ValueError("a per-class weight needs an input of at least 1 dimension, got []")
    return s[-1]


def _target_shape(s: Shape, opts: Mapping[str, Any]) -> Shape:
    """The input's shape; a broadcast one ("broadcast": True, torch warns about the sizes); or one
    of higher rank ("broadcast": "up", the input broadcasts up to it)."""
    if opts.get("broadcast") == "up":
        return (2, *s)
    if opts.get("broadcast"):
        return (s[-1],) if len(s) > 1 else (1,)
    return s


def regression(d: Draw, s: Shape, opts: Mapping[str, Any], *, weighted: bool = True) -> dict[str, Any]:
    """l1_loss, mse_loss, huber_loss: input, target, optional weight ("weight")."""
    out = {"input": d.randn(*s), "target": d.randn(*_target_shape(s, opts))}
    if weighted and opts.get("weight"):
        out["weight"] = d.uniform(*s, lo=0.2, hi=2.0)
    return out | torch_options(opts)


def smooth_l1_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """As regression, without a weight (torch's smooth_l1_loss takes none)."""
    return regression(d, s, opts, weighted=False)


def poisson_nll_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = torch_options(opts)
    if kwargs.get("log_input", True):
        x = d.randn(*s)
    else:
        x = d.uniform(*s, lo=0.0, hi=3.0)
        x.reshape(-1)[:1] = 0.0  # where eps matters
    y = d.classes(_target_shape(s, opts), 5).astype("float64")  # counts, some 0 and 1 (full)
    return {"input": x, "target": y} | kwargs


def gaussian_nll_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    x, y = d.randn(*s), d.randn(*s)
    kind = opts.get("var", "same")
    var: Any
    if kind == "short":  # one dimension short: homoscedastic
        var = d.uniform(*s[:-1], lo=0.3, hi=2.0)
    elif kind == "one":  # one size-1 dimension
        var = d.uniform(*s[:-1], 1, lo=0.3, hi=2.0)
    elif kind == "float":  # a Python float
        var = 0.7
    else:
        var = d.uniform(*s, lo=0.3, hi=2.0)
        if kind == "small":  # some entries below eps, clamped
            var.reshape(-1)[:2] = 1e-3
    return {"input": x, "target": y, "var": var} | torch_options(opts)


def kl_div(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = torch_options(opts)
    x = d.log_softmax(*s, dim=-1)
    y = d.log_softmax(*s, dim=-1) if kwargs.get("log_target") else d.softmax(*s, dim=-1)
    return {"input": x, "target": y} | kwargs


def binary_cross_entropy(d: Draw, s: Shape, opts: Mapping[str, Any], *, logits: bool = False) -> dict[str, Any]:
    x = d.randn(*s) if logits else d.uniform(*s, lo=0.05, hi=0.95)
    out = {"input": x, "target": d.uniform(*s) if opts.get("soft") else d.bits(*s)}
    if opts.get("weight") == "full":
        out["weight"] = d.uniform(*s, lo=0.2, hi=2.0)
    elif opts.get("weight") == "broadcast":
        out["weight"] = d.uniform(_last(s), lo=0.2, hi=2.0)
    if logits and opts.get("pos_weight"):
        out["pos_weight"] = d.uniform(_last(s), lo=0.5, hi=3.0)
    return out | torch_options(opts)


def binary_cross_entropy_with_logits(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    return binary_cross_entropy(d, s, opts, logits=True)


def margin_ranking_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    return {"input1": d.randn(*s), "input2": d.randn(*s), "target": d.sign(*s)} | torch_options(opts)


def signs(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """hinge_embedding_loss, soft_margin_loss: a target of +-1 labels."""
    return {"input": d.randn(*s), "target": d.sign(*_target_shape(s, opts))} | torch_options(opts)


_REGRESSION = (
    Options("weight", {"weight": "full"}),
    Options("target_broadcast", {"broadcast": True}),
    Options("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
    Options("scalar", {"shape": ()}, batched=(True,)),
)
_MATRIX, _VECTOR = (3, 4), (5,)

ENTRIES = (
    Entry("l1_loss", regression, _MATRIX, _VECTOR, options(*_REGRESSION)),
    Entry("mse_loss", regression, _MATRIX, _VECTOR, options(*_REGRESSION)),
    Entry(
        "poisson_nll_loss",
        poisson_nll_loss,
        _MATRIX,
        _VECTOR,
        options(
            Options("full", t(full=True)),
            Options("linear", t(log_input=False)),
            Options("linear_eps", t(log_input=False, eps=0.1)),
            Options("linear_full", t(log_input=False, full=True)),
            Options("log_eps_unused", t(log_input=True, eps=0.5, full=True)),
            Options("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
        ),
    ),
    Entry(
        "gaussian_nll_loss",
        gaussian_nll_loss,
        _MATRIX,
        _VECTOR,
        options(
            Options("var_short", {"var": "short"}, batched=(True,)),
            Options("var_size_one", {"var": "one"}),
            Options("var_float", {"var": "float"}),
            Options("full", t(full=True)),
            Options("eps", {**t(eps=0.01), "var": "small"}),
            Options("full_eps_short", {**t(full=True, eps=0.5), "var": "short"}, batched=(True,)),
            deprecated=False,
        ),
    ),
    Entry(
        "kl_div",
        kl_div,
        (3, 5),
        _VECTOR,
        options(Options("log_target", t(log_target=True))),
        reductions=("none", "mean", "sum", "batchmean"),
    ),
    Entry(
        "binary_cross_entropy",
        binary_cross_entropy,
        _MATRIX,
        _VECTOR,
        options(
            Options("soft_target", {"soft": True}),
            Options("weight", {"weight": "full"}),
            Options("weight_broadcast", {"weight": "broadcast", "soft": True}, batched=(True,)),
        ),
    ),
    Entry(
        "binary_cross_entropy_with_logits",
        binary_cross_entropy_with_logits,
        _MATRIX,
        _VECTOR,
        options(
            Options("soft_target", {"soft": True}),
            Options("weight", {"weight": "full"}),
            Options("weight_broadcast", {"weight": "broadcast"}, batched=(True,)),
            Options("pos_weight", {"pos_weight": True, "soft": True}),
            Options("weight_pos_weight", {"weight": "full", "pos_weight": True}),
        ),
    ),
    Entry(
        "margin_ranking_loss",
        margin_ranking_loss,
        (6,),
        (),
        options(Options("margin", t(margin=0.5)), Options("margin_negative", t(margin=-0.3))),
    ),
    Entry(
        "hinge_embedding_loss",
        signs,
        _MATRIX,
        _VECTOR,
        options(
            Options("margin", t(margin=0.5)),
            Options("margin_large", t(margin=2.0)),
            Options("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
        ),
    ),
    Entry(
        "huber_loss",
        regression,
        _MATRIX,
        _VECTOR,
        options(
            Options("delta_small", t(delta=0.5)),
            Options("delta_large", t(delta=2.0)),
            Options("weight", {"weight": "full"}),
            Options("weight_delta", {**t(delta=0.3), "weight": "full"}, batched=(True,)),
            Options("target_broadcast", {"broadcast": True}),
            Options("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
            deprecated=False,
        ),
    ),
    Entry(
        "smooth_l1_loss",
        smooth_l1_loss,
        _MATRIX,
        _VECTOR,
        options(
            Options("beta_zero", t(beta=0.0)),
            Options("beta_small", t(beta=0.5)),
            Options("beta_large", t(beta=2.0)),
            Options("target_broadcast", {"broadcast": True}),
            Options("target_broadcast_up", {"broadcast": "up"}, batched=(True,)),
        ),
    ),
    Entry("soft_margin_loss", signs, _MATRIX, _VECTOR, options()),
)
