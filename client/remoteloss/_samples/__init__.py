"""Sample inputs: one entry per loss, the one source of valid arguments (as torch's OpInfo
``sample_inputs``).

``ENTRIES[loss]`` makes every argument of a valid call from a seed, the shape of the loss's main
argument and an option set, and lists the option sets (every option torch has, alone and in the
combinations that interact), the reductions and the shapes the tests cover. The tests comparing
the server with torch, the batching and streaming tests, the validation examples, the ``nn``
module tests and ``remoteloss bench``'s payloads all draw from it.

Values are numpy (float64, or integers), so the SDK needs no torch for them; the callers cast
them to the dtype they want. Only option sets that name torch objects (a distance function,
``LinearCrossEntropyOptions``) import torch, when they are made. The server never imports this.
"""

from __future__ import annotations

from remoteloss._request import LOSS_NAMES
from remoteloss._samples import classes, elementwise, embeddings
from remoteloss._samples.base import OMIT, STD, Draw, Entry, Options, RemoteOnly

__all__ = ["ENTRIES", "OMIT", "STD", "Draw", "Entry", "Options", "RemoteOnly"]

_FAMILIES = (elementwise, classes, embeddings)
_ALL = {entry.loss: entry for family in _FAMILIES for entry in family.ENTRIES}
if set(_ALL) != set(LOSS_NAMES) or len(_ALL) != sum(len(family.ENTRIES) for family in _FAMILIES):
    differ = sorted(set(_ALL) ^ set(LOSS_NAMES))
    raise TypeError(f"one sample entry per ComputeRequest.loss field; differs for {differ}")

# One entry per loss, in the order of the ComputeRequest.loss oneof.
ENTRIES: dict[str, Entry] = {name: _ALL[name] for name in LOSS_NAMES}
