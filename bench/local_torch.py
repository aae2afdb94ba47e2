"""The compute limit: one loss computed by torch in this process, no transport at all.

    python bench/local_torch.py --loss mse_loss --shape 1000 [--grad] [--threads 1] [--duration 1]

Prints JSON: the median and mean seconds of one forward (under ``torch.inference_mode``, as the
server computes without gradients) or forward and ``torch.autograd.grad`` of the main argument
(as the server computes gradients), on tensors already in memory, with ``--threads`` intra-op
threads (the server's ``--torch-threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from remoteloss import codec
from remoteloss_bench.payload import build, parse_shape
from remoteloss._request import tensor_names


def measure(loss: str, shape: tuple[int, ...], grad: bool, seconds: float) -> list[float]:
    request = build(loss, shape, "float32", grad=grad)
    message = getattr(request, loss)
    names = [name for name in tensor_names(loss) if message.HasField(name)]
    tensors = {name: codec.decode_torch(getattr(message, name), name).clone() for name in names}
    main = names[0]
    function = getattr(F, loss)

    def once() -> None:
        if grad:
            leaf = tensors[main].detach().requires_grad_(True)
            value = function(**{**tensors, main: leaf})
            torch.autograd.grad(value, [leaf])
        else:
            with torch.inference_mode():
                function(**tensors)

    for _ in range(20):
        once()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", default="mse_loss")
    parser.add_argument("--shape", default="1000")
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--duration", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = measure(args.loss, parse_shape(args.shape), args.grad, args.duration)
    json.dump({"p50_s": statistics.median(times), "mean_s": statistics.fmean(times), "count": len(times),
               "threads": args.threads}, sys.stdout)


if __name__ == "__main__":
    main()
