"""remoteloss: every ``torch.nn`` loss, computed on a remote server, with gradients.

``remoteloss.Client`` has one method per ``torch.nn.functional`` loss, with torch's
signature; ``remoteloss.nn`` has the loss modules (it needs torch); ``remoteloss.codec``
converts arrays to and from the wire's ``Tensor`` message.
"""

from remoteloss import codec
from remoteloss._client import Client
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

__all__ = [
    "CancelledError",
    "Client",
    "CosineDistance",
    "DeadlineExceededError",
    "InternalServerError",
    "InvalidArgumentError",
    "LossServiceError",
    "PairwiseDistance",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServiceUnavailableError",
    "UnauthenticatedError",
    "UnimplementedError",
]
__version__ = "0.1.0"
