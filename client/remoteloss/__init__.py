"""remoteloss: every ``torch.nn`` loss, computed on a remote server, with gradients.

``remoteloss.Client`` has one method per ``torch.nn.functional`` loss, with torch's
signature; ``remoteloss.AsyncClient`` has the same as coroutines; ``client.stream()`` keeps
many calls in flight on one stream; ``remoteloss.nn`` has the loss modules (it needs torch);
``remoteloss.codec`` converts arrays to and from the wire's ``Tensor`` message.
"""

from remoteloss import codec
from remoteloss._client import AsyncClient, Client
from remoteloss._distances import CosineDistance, PairwiseDistance
from remoteloss._errors import (
    CancelledError,
    DeadlineExceededError,
    InternalServerError,
    InvalidArgumentError,
    LossServiceError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    UnauthenticatedError,
    UnimplementedError,
)
from remoteloss._stream import AsyncStream, LossFuture, Stream

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "CancelledError",
    "Client",
    "CosineDistance",
    "DeadlineExceededError",
    "InternalServerError",
    "InvalidArgumentError",
    "LossFuture",
    "LossServiceError",
    "PairwiseDistance",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServiceUnavailableError",
    "Stream",
    "UnauthenticatedError",
    "UnimplementedError",
]
__version__ = "0.1.0"
