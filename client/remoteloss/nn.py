"""torch.nn loss modules whose forward runs on a remoteloss server.

Each class here subclasses the ``torch.nn`` class of the same name: the constructor takes torch's
parameters in torch's order with torch's defaults (deprecated ``size_average``/``reduce`` included),
registers the same buffers and parameters, so ``state_dict()`` and ``repr()`` match torch's, and
``isinstance(loss, torch.nn.CrossEntropyLoss)`` holds. Only ``forward`` differs: it calls the
same-named method of a :class:`remoteloss.Client` exactly as torch's forward calls
``torch.nn.functional``, so the result carries a ``grad_fn`` and ``backward()`` works as usual::

    import remoteloss.nn as rnn
    loss = rnn.CrossEntropyLoss(label_smoothing=0.1)            # or target="host:50051", client=...
    loss(logits, labels).backward()

Two keyword-only parameters choose the server: ``client`` (a :class:`remoteloss.Client`, shared, never
closed here) or ``target`` (a gRPC target; the module makes its own client on first forward). With
neither, every such module shares one process-wide client for ``$REMOTELOSS_TARGET``
(default ``localhost:50051``), made on the first forward that needs it, never at import or
construction. ``copy.deepcopy`` shares the connection. Pickling keeps only a target (``target=``, or
the given client's ``target``), never a client: the unpickled module makes a plain client for it.

``import remoteloss`` does not import this module; it needs torch. Without torch, importing it
raises an ImportError (a ``ModuleNotFoundError`` for ``torch``) that says what to install, or
what to use instead: ``remoteloss.Client`` takes numpy arrays, and ``value_and_grad`` gives
the gradients.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    import torch
    from torch import Tensor
    from torch.nn import LinearCrossEntropyOptions
except ModuleNotFoundError as exc:
    if exc.name != "torch":
        raise
    raise ModuleNotFoundError(
        "remoteloss.nn needs torch, which is not installed: `pip install torch` (or "
        "`pip install 'remoteloss[torch]'`, which brings it). Without torch, use remoteloss.Client "
        "with numpy arrays: client.mse_loss(x, y) gives the loss, and "
        "client.value_and_grad('mse_loss', x, y) the loss and its gradients.",
        name="torch",
    ) from exc

# How a module finds its client; as ``_ClientRef``, the name pickles made before it moved hold.
from remoteloss._nn_client import ClientRef as _ClientRef

if TYPE_CHECKING:
    from remoteloss import Client

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CTCLoss",
    "CosineEmbeddingLoss",
    "CrossEntropyLoss",
    "GaussianNLLLoss",
    "HingeEmbeddingLoss",
    "HuberLoss",
    "KLDivLoss",
    "L1Loss",
    "LinearCrossEntropyLoss",
    "MSELoss",
    "MarginRankingLoss",
    "MultiLabelMarginLoss",
    "MultiLabelSoftMarginLoss",
    "MultiMarginLoss",
    "NLLLoss",
    "PoissonNLLLoss",
    "SmoothL1Loss",
    "SoftMarginLoss",
    "TripletMarginLoss",
    "TripletMarginWithDistanceLoss",
]

class _RemoteLoss(torch.nn.Module):
    """Mixin placed before the torch class: holds the client reference."""

    _remote: _ClientRef

    def _call(self, loss: str, /, *args: Any, **kwargs: Any) -> Tensor:
        """``client.<loss>(*args, **kwargs)``, as torch's forward calls ``F.<loss>``."""
        result: Tensor = getattr(self._remote.get(), loss)(*args, **kwargs)
        return result


class L1Loss(_RemoteLoss, torch.nn.L1Loss):
    """:class:`torch.nn.L1Loss`, computed remotely."""

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("l1_loss", input, target, reduction=self.reduction)


class NLLLoss(_RemoteLoss, torch.nn.NLLLoss):
    """:class:`torch.nn.NLLLoss`, computed remotely."""

    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, ignore_index: int = -100,
                 reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("nll_loss", input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class PoissonNLLLoss(_RemoteLoss, torch.nn.PoissonNLLLoss):
    """:class:`torch.nn.PoissonNLLLoss`, computed remotely."""

    def __init__(self, log_input: bool = True, full: bool = False, size_average: bool | None = None,
                 eps: float = 1e-08, reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(log_input, full, size_average, eps, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, log_input: Tensor, target: Tensor) -> Tensor:
        return self._call("poisson_nll_loss", log_input, target, log_input=self.log_input, full=self.full,
                          eps=self.eps, reduction=self.reduction)


class GaussianNLLLoss(_RemoteLoss, torch.nn.GaussianNLLLoss):
    """:class:`torch.nn.GaussianNLLLoss`, computed remotely."""

    def __init__(self, *, full: bool = False, eps: float = 1e-06, reduction: str = "mean",
                 client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(full=full, eps=eps, reduction=reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor, var: Tensor | float) -> Tensor:
        return self._call("gaussian_nll_loss", input, target, var, full=self.full, eps=self.eps,
                          reduction=self.reduction)


class KLDivLoss(_RemoteLoss, torch.nn.KLDivLoss):
    """:class:`torch.nn.KLDivLoss`, computed remotely."""

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 log_target: bool = False, *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction, log_target)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("kl_div", input, target, reduction=self.reduction, log_target=self.log_target)


class MSELoss(_RemoteLoss, torch.nn.MSELoss):
    """:class:`torch.nn.MSELoss`, computed remotely."""

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("mse_loss", input, target, reduction=self.reduction)


class BCELoss(_RemoteLoss, torch.nn.BCELoss):
    """:class:`torch.nn.BCELoss`, computed remotely."""

    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("binary_cross_entropy", input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_RemoteLoss, torch.nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss`, computed remotely."""

    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", pos_weight: Tensor | None = None,
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("binary_cross_entropy_with_logits", input, target, self.weight,
                          pos_weight=self.pos_weight, reduction=self.reduction)


class HingeEmbeddingLoss(_RemoteLoss, torch.nn.HingeEmbeddingLoss):
    """:class:`torch.nn.HingeEmbeddingLoss`, computed remotely."""

    def __init__(self, margin: float = 1.0, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(margin, size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("hinge_embedding_loss", input, target, margin=self.margin, reduction=self.reduction)


class MultiLabelMarginLoss(_RemoteLoss, torch.nn.MultiLabelMarginLoss):
    """:class:`torch.nn.MultiLabelMarginLoss`, computed remotely."""

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("multilabel_margin_loss", input, target, reduction=self.reduction)


class SmoothL1Loss(_RemoteLoss, torch.nn.SmoothL1Loss):
    """:class:`torch.nn.SmoothL1Loss`, computed remotely."""

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 beta: float = 1.0, *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction, beta)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("smooth_l1_loss", input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(_RemoteLoss, torch.nn.HuberLoss):
    """:class:`torch.nn.HuberLoss`, computed remotely."""

    def __init__(self, reduction: str = "mean", delta: float = 1.0,
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(reduction, delta)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("huber_loss", input, target, reduction=self.reduction, delta=self.delta)


class SoftMarginLoss(_RemoteLoss, torch.nn.SoftMarginLoss):
    """:class:`torch.nn.SoftMarginLoss`, computed remotely."""

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("soft_margin_loss", input, target, reduction=self.reduction)


class CrossEntropyLoss(_RemoteLoss, torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss`, computed remotely."""

    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, ignore_index: int = -100,
                 reduce: bool | None = None, reduction: str = "mean", label_smoothing: float = 0.0,
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("cross_entropy", input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction, label_smoothing=self.label_smoothing)


class LinearCrossEntropyLoss(_RemoteLoss, torch.nn.LinearCrossEntropyLoss):
    """:class:`torch.nn.LinearCrossEntropyLoss`, computed remotely.

    The learnable ``linear`` layer lives here, stored flat as torch stores it
    (``linear.weight``: ``(C * prod(out_features), in_features)``); forward reshapes it to
    ``(C, *out_features, in_features)`` and sends it with each call, so gradients reach it.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device: Any = None, dtype: Any = None, reduction: str = "mean",
                 weight: Tensor | None = None, ignore_index: int | None = None, label_smoothing: float = 0.0,
                 options: LinearCrossEntropyOptions | None = None,
                 client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device,
                         dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (self.linear.bias.reshape((self.num_classes, *self.out_features))
                       if self.linear.bias is not None else None)
        return self._call("linear_cross_entropy", input, linear_weight, target, linear_bias=linear_bias,
                          weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
                          label_smoothing=self.label_smoothing, options=self.options)


class MultiLabelSoftMarginLoss(_RemoteLoss, torch.nn.MultiLabelSoftMarginLoss):
    """:class:`torch.nn.MultiLabelSoftMarginLoss`, computed remotely."""

    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("multilabel_soft_margin_loss", input, target, weight=self.weight,
                          reduction=self.reduction)


class CosineEmbeddingLoss(_RemoteLoss, torch.nn.CosineEmbeddingLoss):
    """:class:`torch.nn.CosineEmbeddingLoss`, computed remotely."""

    def __init__(self, margin: float = 0.0, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(margin, size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return self._call("cosine_embedding_loss", input1, input2, target, margin=self.margin,
                          reduction=self.reduction)


class MarginRankingLoss(_RemoteLoss, torch.nn.MarginRankingLoss):
    """:class:`torch.nn.MarginRankingLoss`, computed remotely."""

    def __init__(self, margin: float = 0.0, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(margin, size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return self._call("margin_ranking_loss", input1, input2, target, margin=self.margin,
                          reduction=self.reduction)


class MultiMarginLoss(_RemoteLoss, torch.nn.MultiMarginLoss):
    """:class:`torch.nn.MultiMarginLoss`, computed remotely."""

    def __init__(self, p: int = 1, margin: float = 1.0, weight: Tensor | None = None,
                 size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(p, margin, weight, size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._call("multi_margin_loss", input, target, p=self.p, margin=self.margin, weight=self.weight,
                          reduction=self.reduction)


class TripletMarginLoss(_RemoteLoss, torch.nn.TripletMarginLoss):
    """:class:`torch.nn.TripletMarginLoss`, computed remotely."""

    def __init__(self, margin: float = 1.0, p: float = 2.0, eps: float = 1e-06, swap: bool = False,
                 size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean",
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(margin, p, eps, swap, size_average, reduce, reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return self._call("triplet_margin_loss", anchor, positive, negative, margin=self.margin, p=self.p,
                          eps=self.eps, swap=self.swap, reduction=self.reduction)


class TripletMarginWithDistanceLoss(_RemoteLoss, torch.nn.TripletMarginWithDistanceLoss):
    """:class:`torch.nn.TripletMarginWithDistanceLoss`, computed remotely.

    As in torch, ``distance_function=None`` stores a ``torch.nn.PairwiseDistance()``; forward hands
    ``self.distance_function`` to the client, which sends the distances the wire can name.
    """

    def __init__(self, *, distance_function: Callable[[Tensor, Tensor], Tensor] | None = None,
                 margin: float = 1.0, swap: bool = False, reduction: str = "mean",
                 client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(distance_function=distance_function, margin=margin, swap=swap, reduction=reduction)
        self._remote = _ClientRef(client, target)

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return self._call("triplet_margin_with_distance_loss", anchor, positive, negative,
                          distance_function=self.distance_function, margin=self.margin, swap=self.swap,
                          reduction=self.reduction)


class CTCLoss(_RemoteLoss, torch.nn.CTCLoss):
    """:class:`torch.nn.CTCLoss`, computed remotely."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False,
                 *, client: "Client | None" = None, target: str | None = None) -> None:
        super().__init__(blank, reduction, zero_infinity)
        self._remote = _ClientRef(client, target)

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
        return self._call("ctc_loss", log_probs, targets, input_lengths, target_lengths, self.blank,
                          self.reduction, self.zero_infinity)
