"""Every loss as a ``LossSpec``: decoding, validation and description of its request message.

``LOSSES[name].prepare(message, device)`` turns one per-loss message into a validated
``Call``; ``describe_all(LOSSES.values())`` answers ListLosses. Nothing here imports grpc.

- ``spec``: the machinery (``LossSpec``, ``TensorArg``, dtype sets)
- ``call``: ``Call``, one validated torch call
- ``batching``: how calls of one loss share a batch
- ``catalog``: one spec per loss, in proto order
- ``checks``: host-side checks run before any tensor reaches the device
- ``hooks``: decoders for the few options that are not plain scalars
- ``describe``: ``LossInfo`` messages for ListLosses
"""

from remoteloss_server.losses.catalog import LOSSES
from remoteloss_server.losses.describe import describe, describe_all
from remoteloss_server.losses.call import Call
from remoteloss_server.losses.spec import Args, LossSpec, TensorArg

__all__ = ["LOSSES", "Args", "Call", "LossSpec", "TensorArg", "describe", "describe_all"]
