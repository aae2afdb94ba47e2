"""Request templates (``templates``): a request whose bytes match a checked one's outside its
tensors' data is that request's call with its own tensors, and nothing else is."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from remoteloss._request import build_request
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.errors import InvalidArgumentError, UnimplementedError
from remoteloss_server.intake import Intake, Prepared, Received, prepare, receive
from remoteloss_server.scheduling import SchedulingPolicy
from remoteloss_server.field_scan import MAX_FIELDS, Layout, scan
from remoteloss_server import templates
from remoteloss_server.templates import PER_SIZE, SEEN_PER_SIZE, Template, item_request

MAX_ELEMENTS = 2**20


def _intake(templates: int = 64) -> Intake:
    return Intake(SchedulingPolicy(), max_elements=MAX_ELEMENTS, max_request_elements=2**24, templates=templates)


def _cross_entropy(seed: int, target: list[int] | None = None, reduction: str = "none") -> bytes:
    generator = torch.Generator().manual_seed(seed)
    request = build_request(
        "cross_entropy",
        {"input": torch.randn(4, 3, generator=generator, dtype=torch.float64),
         "target": torch.tensor(target if target is not None else [0, 2, 1, 2]),
         "weight": torch.rand(3, generator=generator, dtype=torch.float64),
         "label_smoothing": 0.125, "reduction": reduction},
        wrt=("input",), grad_output=torch.rand(4, generator=generator, dtype=torch.float64),
    )
    return request.SerializeToString()


def _full(data: bytes) -> Prepared:
    """What a server without templates makes of ``data``."""
    return _intake(0).prepare_now(_intake(0).receive(data))


def _teach(intake: Intake, data: bytes) -> Prepared:
    """``data`` checked twice: the first time its size is remembered, the second it is kept."""
    intake.prepare_now(intake.receive(data))
    return intake.prepare_now(intake.receive(data))


def _same(a: Prepared, b: Prepared) -> None:
    assert (a.loss, a.elements, a.call.loss, a.call.function) == (b.loss, b.elements, b.call.loss, b.call.function)
    assert (a.call.options, a.call.requires_grad, a.call.implied_elements) == (
        b.call.options, b.call.requires_grad, b.call.implied_elements)
    assert a.call.tensors.keys() == b.call.tensors.keys()
    pairs: list[tuple[Any, Any]] = [(a.grad_output, b.grad_output)]
    pairs += [(a.call.tensors[name], b.call.tensors[name]) for name in a.call.tensors]
    for x, y in pairs:
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))  # bitwise


def test_a_request_like_a_checked_one_is_its_call_with_its_own_tensors() -> None:
    intake = _intake()
    first = _teach(intake, _cross_entropy(1))
    _same(first, _full(_cross_entropy(1)))
    second = _cross_entropy(2)
    received = intake.receive(second)
    assert isinstance(received.template, Template) and received.message.WhichOneof("loss") == "cross_entropy"
    recalled = intake.prepare_now(received)
    _same(recalled, _full(second))
    assert not torch.equal(recalled.call.tensors["input"], first.call.tensors["input"])  # its own bytes
    recalled.call.tensors["input"].add_(1)  # its own memory too: the request's bytes are not written
    assert _full(second).call.tensors["input"].ne(recalled.call.tensors["input"]).all()


def test_a_change_of_any_byte_outside_the_tensors_data_takes_the_full_path() -> None:
    intake = _intake()
    data = _cross_entropy(1)
    _teach(intake, data)
    (template,) = intake.templates._by_size[len(data)]
    outside = [at + i for at, kept in template.kept for i in range(len(kept))]
    inside = sorted(set(range(len(data))) - set(outside))
    assert len(inside) == 8 * (4 * 3 + 4 + 3 + 4)  # input, target, weight, grad_output: 8 bytes an element
    for at in outside:
        changed = bytearray(data)
        changed[at] ^= 0x01
        assert intake.receive(bytes(changed)).template is None, at
    for at in inside[::7]:
        changed = bytearray(data)
        changed[at] ^= 0x40
        assert intake.receive(bytes(changed)).template is template, at


def test_the_losss_value_checks_run_again_on_a_templates_tensors() -> None:
    intake = _intake()
    _teach(intake, _cross_entropy(1))
    bad = _cross_entropy(1, target=[0, 2, 7, 2])
    received = intake.receive(bad)
    assert received.template is not None
    with pytest.raises(InvalidArgumentError) as recalled:
        intake.prepare_now(received)
    with pytest.raises(InvalidArgumentError) as full:
        _full(bad)
    assert str(recalled.value) == str(full.value) and "class 7" in str(recalled.value)


def test_an_option_of_the_same_size_is_another_template() -> None:
    intake = _intake()
    for reduction in ("none", "sum", "mean", "none", "sum"):
        data = _cross_entropy(3, reduction=reduction)
        received = intake.receive(data)
        prepared = intake.prepare_now(received)
        assert prepared.call.options["reduction"] == reduction
        _same(prepared, _full(data))
    assert len({len(_cross_entropy(3, reduction=r)) for r in ("none", "sum", "mean")}) == 1
    assert len(intake.templates._by_size[len(data)]) == 3 <= PER_SIZE


def test_refused_unknown_or_empty_requests_are_not_kept() -> None:
    intake = _intake()
    for _ in range(2):  # the second time, a request of its size missed before
        with pytest.raises(InvalidArgumentError):
            intake.prepare_now(intake.receive(_cross_entropy(1, target=[0, 9, 1, 2])))
        unknown = _cross_entropy(1) + b"\xf8\x07\x01"  # field 127, a varint: unknown to ComputeRequest
        with pytest.raises(UnimplementedError):
            intake.prepare_now(intake.receive(unknown))
        empty = build_request("mse_loss", {"input": torch.zeros(0), "target": torch.zeros(0)}).SerializeToString()
        intake.prepare_now(intake.receive(empty))
    assert not intake.templates._by_size
    large = build_request("mse_loss", {"input": torch.zeros(3, 20_000), "target": torch.zeros(3, 20_000)})
    data = large.SerializeToString()
    _teach(intake, data)
    assert intake.receive(data).template is None  # above MAX_REQUEST_BYTES: checked whole each time
    off = _intake(0)
    off.receive(_cross_entropy(1))
    assert off.receive(_cross_entropy(1)).data is None  # off: nothing kept for learning


def _mse(n: int) -> bytes:
    return build_request("mse_loss", {"input": torch.zeros(n), "target": torch.ones(n)}).SerializeToString()


def test_a_structure_checked_twice_before_either_is_kept_is_kept_once() -> None:
    """A stream's items read together are all received (and miss) before the first is checked
    and kept: the later ones keep nothing more, so they do not push out other structures."""
    intake = _intake()
    intake.receive(_cross_entropy(1))  # its size's first miss
    sum_of = intake.receive(_cross_entropy(1, reduction="sum"))
    together = [intake.receive(_cross_entropy(seed)) for seed in (2, 3, 4)]
    for received in (sum_of, *together):
        intake.prepare_now(received)
    assert len(intake.templates._by_size[len(_cross_entropy(1))]) == 2 and intake.templates.learned == 2


def test_a_structure_of_more_than_max_kept_bytes_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _cross_entropy(1)
    outside = len(data) - 8 * (4 * 3 + 4 + 3 + 4)  # all but input, target, weight and grad_output's data
    for bound, kept in ((outside - 1, False), (outside, True)):
        monkeypatch.setattr(templates, "MAX_KEPT_BYTES", bound)
        intake = _intake()
        _teach(intake, data)
        assert (len(data) in intake.templates._by_size) is kept, bound


def test_templates_are_bounded_by_size_and_by_count_per_size() -> None:
    intake = _intake(templates=3)
    sizes = []
    for n in range(1, 6):
        _teach(intake, _mse(n))
        sizes.append(len(_mse(n)))
    assert list(intake.templates._by_size) == sizes[-3:]  # the sizes learned last
    assert intake.receive(_mse(1)).template is None


def test_a_request_is_kept_the_second_time_its_size_misses() -> None:
    """A structure sent once is not kept, so a caller who sends a new one every call neither
    spends a template's work nor pushes out the templates of those who repeat theirs."""
    intake = _intake(templates=2)
    _teach(intake, _mse(1000))
    one_offs = [_mse(n) for n in range(1, 100)]
    for data in one_offs:
        intake.prepare_now(intake.receive(data))
    assert list(intake.templates._by_size) == [len(_mse(1000))] and intake.templates.learned == 1
    assert intake.receive(_mse(1000)).template is not None  # still there
    assert len(intake.templates._missed) == SEEN_PER_SIZE * 2  # the sizes that missed last, bounded
    assert intake.receive(one_offs[-1]).data is not None  # sent again, while remembered: it may be kept
    assert intake.receive(one_offs[0]).data is None  # forgotten: remembered now, kept the next time


def test_receive_and_prepare_of_a_template_match_the_module_functions() -> None:
    """The template path stands for ``receive`` and ``prepare``: the same loss label and call."""
    data = _cross_entropy(5)
    intake = _intake()
    _teach(intake, _cross_entropy(4))
    received = intake.receive(data)
    parsed = receive(data, pb.ComputeRequest)
    assert received.template is not None and received.size == parsed.size
    call, grad_output = prepare("cross_entropy", parsed.message)  # type: ignore[arg-type]
    _same(intake.prepare_now(received), Prepared("cross_entropy", call, grad_output, received.template.elements))


def _item(request: bytes, item_id: int) -> bytes:
    return pb.ComputeStreamRequest(id=item_id, request=pb.ComputeRequest.FromString(request)).SerializeToString()


def test_a_stream_items_request_matches_as_a_unary_ones_does() -> None:
    intake = _intake()
    _teach(intake, _cross_entropy(1))
    for item_id in (0, 5, 300, 2**64 - 1):  # no id field, and varints of 1, 2 and 10 bytes
        data = _item(_cross_entropy(2), item_id)
        matched, received = intake.receive_item(data)
        assert matched == item_id
        assert received.size == len(data) and received.template is not None
        _same(intake.prepare_now(received), _full(_cross_entropy(2)))
    assert intake.receive_item(_item(_cross_entropy(2, reduction="sum"), 7))[0] is None  # another structure
    assert intake.templates.match(_cross_entropy(2), 0, MAX_FIELDS) is None  # past the field bound with them


def test_only_an_id_then_a_request_to_the_end_is_read_as_an_item() -> None:
    request = _cross_entropy(1)
    item = _item(request, 9)
    assert item_request(item) == (9, len(item) - len(request), 2)
    assert item_request(_item(request, 0)) == (0, len(item) - len(request) - 2, 1)
    request_first = item[2:] + item[:2]  # the same fields, the id last
    assert pb.ComputeStreamRequest.FromString(request_first).id == 9 and item_request(request_first) is None
    assert item_request(item + b"\x08\x01") is None  # a second id after the request
    assert item_request(item[:-1]) is None  # its request cut short
    assert item_request(b"\x08\xff\xff") is None and item_request(b"") is None


def _layout(request: bytes) -> Layout:
    found = Layout()
    assert scan(request, pb.ComputeRequest.DESCRIPTOR, layout=found) is None
    return found


def test_a_stream_items_request_is_learned_from_the_item() -> None:
    intake = _intake()
    request = _cross_entropy(1)
    assert intake.receive_item(_item(request, 1))[1].data is None  # its size's first miss
    for item_id in (0, 5, 300, 2**64 - 1):
        matched, received = intake.receive_item(_item(request, item_id))
        assert matched is None and received.data == request
        assert received.layout == _layout(request)  # as its own scan finds it, from the item's scan
        assert received.layout.spans and received.layout.fields > len(received.layout.spans)
    item = received.message
    assert isinstance(item, pb.ComputeStreamRequest)
    intake.prepare_now(Received(item.request, received.size, data=received.data, layout=received.layout))
    assert intake.receive(_cross_entropy(2)).template is not None
    off_intake = _intake(0)
    off_intake.receive_item(_item(request, 3))
    matched, off = off_intake.receive_item(_item(request, 3))
    assert matched is None and off.data is None and off.layout is None


def test_templates_off_keep_nothing_even_when_asked() -> None:
    off = _intake(0)
    data = _cross_entropy(1)
    prepared = off.prepare_now(off.receive(data))
    off.templates.learn(data, _layout(data), prepared.elements, prepared.call, prepared.grad_output)
    assert off.receive(data).template is None and off.templates.counts() == {"hit": 0, "learned": 0}
