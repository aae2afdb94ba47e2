"""What a wait costs the code that runs after it: torch's small ops and its autograd node, hot and
after the thread slept or other work filled the caches.

    python bench/cold.py [--calls 400]

A remote call leaves its thread asleep for its round trip while gRPC, the server and the other
processes run; what runs next (the SDK's answer into torch, ``.backward()``; on the server, a lone
caller's handler) finds its code and data out of the CPU's caches. This measures that cost
alone, in this process, with no gRPC: the median time of each piece of work when called back to
back (hot), after ``time.sleep(0.001)``, after touching 8 MiB of other memory, and after both.
It is why the autograd path's floor in ``bench/autograd.py`` (``value_and_grad`` plus torch's own
autograd node) sits above the node's hot cost, and why a lone caller's request costs the server
more than each of 64 callers' does (see ANALYSIS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from autograd import _Given

ELEMENTS = 1_000
_OTHER = np.zeros(8 * 1024 * 1024, dtype=np.uint8)  # memory that other work would touch


def _work() -> dict[str, Callable[[], object]]:
    x = torch.zeros(ELEMENTS, requires_grad=True)
    y = torch.ones(ELEMENTS)
    given = (torch.zeros(()), torch.zeros(ELEMENTS))  # an answer's loss and gradient, made once
    values = np.ones(ELEMENTS, dtype=np.float32)

    def node() -> None:  # the SDK's floor: the answer wrapped in an autograd node, then backward
        x.grad = None
        _Given.apply(x, given).backward()  # type: ignore[no-untyped-call]

    return {
        "torch: mse_loss of 1,000 float32": lambda: torch.nn.functional.mse_loss(y, y),
        "torch: an autograd node and backward, 1,000 float32": node,
        "numpy: mean of squares of 1,000 float32": lambda: np.mean(np.square(values)),
    }


def _touch() -> None:
    _OTHER[::64] += 1  # a byte of each cache line


def _sleep_and_touch() -> None:
    time.sleep(0.001)
    _touch()


_BEFORE: dict[str, Callable[[], None]] = {
    "hot": lambda: None,
    "after 1 ms asleep": lambda: time.sleep(0.001),
    "after 8 MiB touched": _touch,
    "after both": _sleep_and_touch,
}


def measure(calls: int) -> dict[str, dict[str, float]]:
    """Median microseconds of each piece of work, by what ran before it."""
    out: dict[str, dict[str, float]] = {}
    for name, work in _work().items():
        for _ in range(20):
            work()
        row = out[name] = {}
        for before_name, before in _BEFORE.items():
            times = []
            for _ in range(calls):
                before()
                start = time.perf_counter()
                work()
                times.append(time.perf_counter() - start)
            row[before_name] = statistics.median(times) * 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls of each work in each state (default: 400)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.calls)
    print("| work (median us) | " + " | ".join(_BEFORE) + " |")
    print("|---|" + "---|" * len(_BEFORE))
    for name, row in rows.items():
        hot = row["hot"]
        print(f"| {name} | " + " | ".join(f"{v:.1f} ({v / hot:.1f}x)" for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
