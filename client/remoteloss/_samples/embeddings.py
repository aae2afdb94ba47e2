"""Sample entries of the embedding losses: pairs and triplets of vectors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from remoteloss._samples.base import Draw, Entry, Options, RemoteOnly, Shape, options, t, torch_options

__all__ = ["ENTRIES"]


def cosine_embedding_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """input1 and input2 (N, D) or (D); one +-1 label per row."""
    target = d.sign(*s[:1]) if len(s) >= 2 else d.sign()
    return {"input1": d.randn(*s), "input2": d.randn(*s), "target": target} | torch_options(opts)


def triplet_margin_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    return {"anchor": d.randn(*s), "positive": d.randn(*s), "negative": d.randn(*s)} | torch_options(opts)


def triplet_margin_with_distance_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """As triplet_margin_loss; "distance" names a distance_function (torch is imported for it)."""
    out = triplet_margin_loss(d, s, opts)
    if "distance" in opts:
        out["distance_function"] = _distance(opts["distance"], len(s) - 1)
    return out


def _distance(name: str, last_dim: int) -> Any:
    from torch import nn
    from torch.nn import functional as F

    if name == "functional":
        return F.pairwise_distance
    if name == "remoteloss_pairwise":
        return _remoteloss_pairwise(p=1.5, eps=1e-4)
    if name == "cosine":
        return _cosine_distance(last_dim, None)
    if name == "cosine_opts":
        return _cosine_distance(-1, 1e-4)
    pairwise: dict[str, dict[str, Any]] = {
        "pairwise_p1": {"p": 1},
        "pairwise_inf": {"p": float("inf")},
        "pairwise_eps_keepdim": {"p": 3.0, "eps": 1e-3, "keepdim": True},
    }
    return nn.PairwiseDistance(**pairwise[name])


def _cosine_distance(dim: int, eps: float | None) -> RemoteOnly:
    """``1 - cosine_similarity``: a lambda in torch, ``remoteloss.CosineDistance`` remotely."""
    from torch.nn import functional as F

    from remoteloss._distances import CosineDistance

    def local(x1: Any, x2: Any) -> Any:
        return 1.0 - F.cosine_similarity(x1, x2, dim=dim, eps=1e-8 if eps is None else eps)

    return RemoteOnly(local, lambda: CosineDistance(dim=dim) if eps is None else CosineDistance(dim=dim, eps=eps))


def _remoteloss_pairwise(p: float, eps: float) -> RemoteOnly:
    from torch import nn

    from remoteloss._distances import PairwiseDistance

    return RemoteOnly(nn.PairwiseDistance(p=p, eps=eps), lambda: PairwiseDistance(p=p, eps=eps))


_VECTORS = ((4, 3), (3,))

ENTRIES = (
    Entry(
        "cosine_embedding_loss",
        cosine_embedding_loss,
        *_VECTORS,
        options(Options("margin", t(margin=0.5)), Options("margin_negative", t(margin=-0.5))),
    ),
    Entry(
        "triplet_margin_loss",
        triplet_margin_loss,
        *_VECTORS,
        options(
            Options("margin", t(margin=0.5)),
            Options("p1", t(p=1)),
            Options("p3", t(p=3.0)),
            Options("eps", t(eps=0.1)),
            Options("swap", t(swap=True)),
            Options("all", t(margin=2.0, p=1.5, eps=1e-3, swap=True)),
        ),
    ),
    Entry(
        "triplet_margin_with_distance_loss",
        triplet_margin_with_distance_loss,
        *_VECTORS,
        options(
            Options("pairwise_p1", {"distance": "pairwise_p1"}),
            Options("pairwise_inf", {"distance": "pairwise_inf"}),
            Options("pairwise_eps_keepdim", {"distance": "pairwise_eps_keepdim"}, batched=(True,)),
            Options("functional", {"distance": "functional"}),
            Options("remoteloss_pairwise", {"distance": "remoteloss_pairwise"}),
            Options("cosine", {"distance": "cosine"}),
            Options("cosine_opts", {"distance": "cosine_opts"}),
            Options("margin", t(margin=0.3)),
            Options("swap", t(swap=True)),
            Options("cosine_swap_margin", {**t(swap=True, margin=1.5), "distance": "cosine"}),
            deprecated=False,
        ),
    ),
)
