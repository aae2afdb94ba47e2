"""One method per loss, with exactly the signature of its ``torch.nn.functional`` twin.

Every method hands its arguments, by name, to ``_compute``; the request is built from
the message descriptors, so nothing here knows a field. A test compares each signature
with torch's, so any drift fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

    # A torch tensor, a numpy array, or anything numpy.asarray takes (numbers, nested lists).
    ArrayLike = Union[torch.Tensor, npt.ArrayLike]
    LinearCrossEntropyOptions = Any  # torch.nn.LinearCrossEntropyOptions, new in torch 2.13

__all__ = ["LossMethods"]


class LossMethods:
    """The 22 losses. Each returns a torch.Tensor when any tensor argument is one, else a numpy array
    (``AsyncClient``: a coroutine giving it; ``Stream``: a future of it)."""

    def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        raise NotImplementedError

    def l1_loss(self, input: ArrayLike, target: ArrayLike, size_average: bool | None = None,
                reduce: bool | None = None, reduction: str = "mean",
                weight: ArrayLike | None = None) -> Any:
        """Mean absolute error: ``torch.nn.functional.l1_loss``."""
        return self._compute("l1_loss", locals())

    def mse_loss(self, input: ArrayLike, target: ArrayLike, size_average: bool | None = None,
                 reduce: bool | None = None, reduction: str = "mean",
                 weight: ArrayLike | None = None) -> Any:
        """Mean squared error: ``torch.nn.functional.mse_loss``."""
        return self._compute("mse_loss", locals())

    def cross_entropy(self, input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
                      size_average: bool | None = None, ignore_index: int = -100,
                      reduce: bool | None = None, reduction: str = "mean",
                      label_smoothing: float = 0.0) -> Any:
        """Cross entropy of logits: ``torch.nn.functional.cross_entropy``."""
        return self._compute("cross_entropy", locals())

    def ctc_loss(self, log_probs: ArrayLike, targets: ArrayLike, input_lengths: ArrayLike,
                 target_lengths: ArrayLike, blank: int = 0, reduction: str = "mean",
                 zero_infinity: bool = False) -> Any:
        """Connectionist Temporal Classification: ``torch.nn.functional.ctc_loss``."""
        return self._compute("ctc_loss", locals())

    def nll_loss(self, input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
                 size_average: bool | None = None, ignore_index: int = -100,
                 reduce: bool | None = None, reduction: str = "mean") -> Any:
        """Negative log likelihood: ``torch.nn.functional.nll_loss``."""
        return self._compute("nll_loss", locals())

    def poisson_nll_loss(self, input: ArrayLike, target: ArrayLike, log_input: bool = True,
                         full: bool = False, size_average: bool | None = None, eps: float = 1e-08,
                         reduce: bool | None = None, reduction: str = "mean") -> Any:
        """Poisson negative log likelihood: ``torch.nn.functional.poisson_nll_loss``."""
        return self._compute("poisson_nll_loss", locals())

    def gaussian_nll_loss(self, input: ArrayLike, target: ArrayLike, var: ArrayLike | float,
                          full: bool = False, eps: float = 1e-06,
                          reduction: str = "mean") -> Any:
        """Gaussian negative log likelihood: ``torch.nn.functional.gaussian_nll_loss``."""
        return self._compute("gaussian_nll_loss", locals())

    def kl_div(self, input: ArrayLike, target: ArrayLike, size_average: bool | None = None,
               reduce: bool | None = None, reduction: str = "mean",
               log_target: bool = False) -> Any:
        """Kullback-Leibler divergence: ``torch.nn.functional.kl_div``."""
        return self._compute("kl_div", locals())

    def binary_cross_entropy(self, input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
                             size_average: bool | None = None, reduce: bool | None = None,
                             reduction: str = "mean") -> Any:
        """Binary cross entropy of probabilities: ``torch.nn.functional.binary_cross_entropy``."""
        return self._compute("binary_cross_entropy", locals())

    def binary_cross_entropy_with_logits(self, input: ArrayLike, target: ArrayLike,
                                         weight: ArrayLike | None = None, size_average: bool | None = None,
                                         reduce: bool | None = None, reduction: str = "mean",
                                         pos_weight: ArrayLike | None = None) -> Any:
        """Binary cross entropy of logits: ``torch.nn.functional.binary_cross_entropy_with_logits``."""
        return self._compute("binary_cross_entropy_with_logits", locals())

    def margin_ranking_loss(self, input1: ArrayLike, input2: ArrayLike, target: ArrayLike,
                            margin: float = 0, size_average: bool | None = None,
                            reduce: bool | None = None, reduction: str = "mean") -> Any:
        """Margin ranking loss: ``torch.nn.functional.margin_ranking_loss``."""
        return self._compute("margin_ranking_loss", locals())

    def hinge_embedding_loss(self, input: ArrayLike, target: ArrayLike, margin: float = 1.0,
                             size_average: bool | None = None, reduce: bool | None = None,
                             reduction: str = "mean") -> Any:
        """Hinge embedding loss: ``torch.nn.functional.hinge_embedding_loss``."""
        return self._compute("hinge_embedding_loss", locals())

    def multilabel_margin_loss(self, input: ArrayLike, target: ArrayLike, size_average: bool | None = None,
                               reduce: bool | None = None, reduction: str = "mean") -> Any:
        """Multi-label margin loss: ``torch.nn.functional.multilabel_margin_loss``."""
        return self._compute("multilabel_margin_loss", locals())

    def huber_loss(self, input: ArrayLike, target: ArrayLike, reduction: str = "mean", delta: float = 1.0,
                   weight: ArrayLike | None = None) -> Any:
        """Huber loss: ``torch.nn.functional.huber_loss``."""
        return self._compute("huber_loss", locals())

    def smooth_l1_loss(self, input: ArrayLike, target: ArrayLike, size_average: bool | None = None,
                       reduce: bool | None = None, reduction: str = "mean",
                       beta: float = 1.0) -> Any:
        """Smooth L1 loss: ``torch.nn.functional.smooth_l1_loss``."""
        return self._compute("smooth_l1_loss", locals())

    def soft_margin_loss(self, input: ArrayLike, target: ArrayLike, size_average: bool | None = None,
                         reduce: bool | None = None, reduction: str = "mean") -> Any:
        """Two-class soft margin loss: ``torch.nn.functional.soft_margin_loss``."""
        return self._compute("soft_margin_loss", locals())

    def multilabel_soft_margin_loss(self, input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
                                    size_average: bool | None = None, reduce: bool | None = None,
                                    reduction: str = "mean") -> Any:
        """Multi-label soft margin loss: ``torch.nn.functional.multilabel_soft_margin_loss``."""
        return self._compute("multilabel_soft_margin_loss", locals())

    def cosine_embedding_loss(self, input1: ArrayLike, input2: ArrayLike, target: ArrayLike,
                              margin: float = 0, size_average: bool | None = None,
                              reduce: bool | None = None, reduction: str = "mean") -> Any:
        """Cosine embedding loss: ``torch.nn.functional.cosine_embedding_loss``."""
        return self._compute("cosine_embedding_loss", locals())

    def multi_margin_loss(self, input: ArrayLike, target: ArrayLike, p: int = 1, margin: float = 1.0,
                          weight: ArrayLike | None = None, size_average: bool | None = None,
                          reduce: bool | None = None, reduction: str = "mean") -> Any:
        """Multi-class margin loss: ``torch.nn.functional.multi_margin_loss``."""
        return self._compute("multi_margin_loss", locals())

    def triplet_margin_loss(self, anchor: ArrayLike, positive: ArrayLike, negative: ArrayLike,
                            margin: float = 1.0, p: float = 2, eps: float = 1e-06, swap: bool = False,
                            size_average: bool | None = None, reduce: bool | None = None,
                            reduction: str = "mean") -> Any:
        """Triplet margin loss: ``torch.nn.functional.triplet_margin_loss``."""
        return self._compute("triplet_margin_loss", locals())

    def triplet_margin_with_distance_loss(self, anchor: ArrayLike, positive: ArrayLike, negative: ArrayLike, *,
                                          distance_function: Callable[..., Any] | None = None,
                                          margin: float = 1.0, swap: bool = False,
                                          reduction: str = "mean") -> Any:
        """Triplet margin loss with a named distance: ``torch.nn.functional.triplet_margin_with_distance_loss``.

        ``distance_function`` is None, ``remoteloss.PairwiseDistance``, ``remoteloss.CosineDistance``,
        ``torch.nn.PairwiseDistance`` or ``torch.nn.functional.pairwise_distance``.
        """
        return self._compute("triplet_margin_with_distance_loss", locals())

    def linear_cross_entropy(self, input: ArrayLike, linear_weight: ArrayLike, target: ArrayLike, *,
                             linear_bias: ArrayLike | None = None, weight: ArrayLike | None = None,
                             reduction: str = "mean", ignore_index: int | None = None,
                             label_smoothing: float = 0.0,
                             options: LinearCrossEntropyOptions | None = None) -> Any:
        """Cross entropy of a linear layer's output: ``torch.nn.functional.linear_cross_entropy``."""
        return self._compute("linear_cross_entropy", locals())
