"""What the server checks in a request, per loss, as Markdown: ``render()`` is docs/VALIDATION.md.

Generated from the loss catalog (tensor arguments, dtypes, shape rules, and ``LossSpec.rejects``:
the option values torch itself rejects, each with an example request field that
tests/integration/test_validation.py sends to a server) and from the docstrings of the checks in
``checks``.
``python scripts/gen_validation.py`` rewrites the file; the same test fails when it is stale.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from remoteloss_server.losses.catalog import LOSSES
from remoteloss_server.losses.spec import MAX_DIMS, LossSpec, dtype_names

__all__ = ["ACCEPTED", "GENERAL", "render"]


GENERAL: tuple[tuple[str, str], ...] = (
    ("no loss set in the request (the `loss` oneof is empty)", "INVALID_ARGUMENT"),
    ("a loss or any other field this server does not know (a newer client's)", "UNIMPLEMENTED"),
    ("bytes that do not parse as the request message", "INVALID_ARGUMENT"),
    ("a required tensor missing; `var` and `var_float` both set, or neither", "INVALID_ARGUMENT"),
    ("`dtype` unset (`DTYPE_UNSPECIFIED`) or an unknown value; a dtype the argument does not take", "INVALID_ARGUMENT"),
    (f"a negative size; more than {MAX_DIMS} dimensions; sizes (zeros counted as ones) multiplying past 2**63 - 1",
     "INVALID_ARGUMENT"),
    ("`len(data)` other than `prod(shape) * itemsize`", "INVALID_ARGUMENT"),
    ("tensors declaring more than `--max-request-elements` elements in all (read from the shapes)", "INVALID_ARGUMENT"),
    (
        (
            "a tensor, or one its arguments imply (a broadcast, `linear_cross_entropy`'s logits, `ctc_loss`'s "
            "alignment table), of more than `--max-elements` elements (default 2**30)"
        ),
        "INVALID_ARGUMENT",
    ),
    ("`requires_grad` on an integer tensor, or on an argument torch does not differentiate", "INVALID_ARGUMENT"),
    ("`reduction` an unknown value, or one the loss does not take (`batchmean` is `kl_div`'s only)",
     "INVALID_ARGUMENT"),
    ("`grad_output` not floating, or of a shape other than the loss's (a 0-d one weighs every element alike)",
     "INVALID_ARGUMENT"),
    ("an unknown enum value in an option (`options.acc_dtype`)", "INVALID_ARGUMENT"),
    ("anything else torch raises for (its message, after the loss's name)", "INVALID_ARGUMENT"),
    (
        (
            "a request over `--max-message-bytes` (gRPC's own answer); the server saturated (`--max-in-flight`, "
            "`--max-in-flight-bytes`); the device out of memory"
        ),
        "RESOURCE_EXHAUSTED",
    ),
)

ACCEPTED: tuple[str, ...] = (
    (
        "NaN and infinities in any floating tensor (the loss is what torch computes, often NaN); except "
        "`binary_cross_entropy`'s `input`, which must lie in [0, 1], as in torch"
    ),
    (
        "`binary_cross_entropy` targets outside [0, 1]: torch rejects them on a CPU (so does a server computing "
        "on a CPU) and computes with them on a GPU (so does a server computing on a GPU)"
    ),
    (
        "NaN, infinities and any sign for options torch does not check: `eps`, every `margin` but the triplet "
        "losses', `triplet_margin_loss`'s `p`, `distance_function`'s `p` and `eps`, `label_smoothing` below 0 or NaN"
    ),
    (
        "any `ignore_index`, `blank` within the classes, `huber_loss`'s `delta` of +inf, `smooth_l1_loss`'s "
        "`beta` of 0 or +inf"
    ),
    "an empty `distance_function` (torch's default distance), an empty `options` (torch's default options)",
)


_INTRO = (
    "Every request is checked before anything is computed. A rejection is a gRPC status whose message "
    "names the loss, the argument and the problem, e.g. `cross_entropy: target holds class 7, but input "
    "has 5 classes (0 to 4, or ignore_index -100)`; the Python client raises it as "
    "`remoteloss.InvalidArgumentError` (also a `ValueError`). Where torch accepts a value, the server "
    "accepts it too and answers what torch computes. Class indices, CTC labels and `binary_cross_entropy`'s "
    "probabilities are checked on the host, before any GPU launch, since torch checks them on a GPU only "
    "with a device-side assert, which would break the CUDA context of the whole process."
)
_PER_LOSS = (
    "Each tensor's dtypes are those torch takes for it in some valid call (a combination torch rejects, "
    "such as a float16 weight with a float32 input, gets torch's own message). Shapes are torch's rules; "
    "the checks listed run on the host, and torch checks the rest of each shape rule itself."
)


def _check_text(check: Any) -> str:
    doc = inspect.getdoc(check) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _tensor_rows(spec: LossSpec) -> Iterable[str]:
    yield "| tensor | dtypes | shape | gradient |"
    yield "|---|---|---|---|"
    for arg in spec.tensors:
        name = f"`{arg.name}`" if arg.required else f"*`{arg.name}`* (optional)"
        gradient = "may require grad" if arg.differentiable else "never"
        yield f"| {name} | {dtype_names(arg.dtypes)} | {arg.shape} | {gradient} |"


def _loss_section(spec: LossSpec) -> Iterable[str]:
    yield f"### `{spec.name}`"
    yield ""
    yield from _tensor_rows(spec)
    yield ""
    yield f"Reductions: {', '.join(f'`{r}`' for r in spec.reductions)}."
    if spec.checks:
        yield ""
        yield "Checked before computing:"
        yield ""
        yield from (f"- {_check_text(check)}" for check in spec.checks)
    if spec.rejects:
        yield ""
        yield "Option values torch rejects (INVALID_ARGUMENT):"
        yield ""
        yield from (f"- `{rule.argument}`: must be {rule.rule}" for rule in spec.rejects)
    yield ""


def render() -> str:
    """docs/VALIDATION.md."""
    lines = [
        "# Bad input: what the server checks",
        "",
        (
            "<!-- Generated by scripts/gen_validation.py from server/remoteloss_server/losses/ "
            "(catalog.py, checks.py, validation.py); do not edit by hand. -->"
        ),
        "",
        _INTRO,
        "",
        "## Every request",
        "",
        "| request | status |",
        "|---|---|",
        *(f"| {what} | {status} |" for what, status in GENERAL),
        "",
        "## What torch accepts, and so does the server",
        "",
        *(f"- {text}" for text in ACCEPTED),
        "",
        "## Per loss",
        "",
        _PER_LOSS,
        "",
    ]
    for spec in LOSSES.values():
        lines.extend(_loss_section(spec))
    return "\n".join(lines).rstrip("\n") + "\n"
