"""``remoteloss bench`` against the test server: a few requests per level, JSON, exit status."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest
from remoteloss._request import LOSS_NAMES
from remoteloss._samples import ENTRIES
from remoteloss_bench import command
from remoteloss_bench import payload as bench_payload
from remoteloss_bench.load import Progress

_FAST = ["--requests", "6", "--warmup", "0", "--quiet"]


def _bench_json(server: Any, tmp_path: Path, *arguments: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "bench.json"
    status = command.main(["--target", server.target, *_FAST, "--json", str(path), *arguments])
    return status, json.loads(path.read_text())


def test_levels_in_json(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = _bench_json(server, tmp_path, "--concurrency", "1,3", "--shape", "8x16", "--grad")
    assert status == 0
    assert report["loss"] == "mse_loss" and report["shape"] == [8, 16] and report["grad"] is True
    assert report["mode"] == "unary" and report["failed"] == 0
    assert report["request_bytes"] > 2 * 8 * 16 * 4 and report["response_bytes"] > 8 * 16 * 4  # the gradient
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["requests"] == 6 and level["errors"] == 0 and level["throughput_rps"] > 0
        latency = level["latency_s"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["concurrency", "requests", "failed"]
    assert [line.split()[:3] for line in out[2:]] == [["1", "6", "0"], ["3", "6", "0"]]


def test_duration_mode(server: Any, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    arguments = ["--target", server.target, "--duration", "0.2", "--warmup", "0.05", "--concurrency", "2"]
    assert command.main([*arguments, "--quiet", "--json", str(path)]) == 0
    (level,) = json.loads(path.read_text())["levels"]
    assert level["requests"] > 0 and 0.15 < level["duration_s"] < 2


def test_rejected_request_fails_the_run(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = _bench_json(server, tmp_path, "--loss", "multi_margin_loss", "--shape", "2x3x4")
    assert status == 1
    assert report["error"].startswith("INVALID_ARGUMENT: multi_margin_loss")
    assert report["failed"] == 1 and report["levels"] == []
    assert "the first request failed: INVALID_ARGUMENT" in capsys.readouterr().err


def test_usage_errors(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.main(["--target", server.target, "--concurrency", "0"]) == 2
    assert command.main(["--target", server.target, "--shape", "3xq"]) == 2
    assert command.main(["--target", server.target, "--loss", "ctc_loss", "--shape", "5"]) == 2
    assert "ctc_loss: shape must be" in capsys.readouterr().err


def test_plot_needs_matplotlib(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert command.main(["--target", server.target, *_FAST, "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'remoteloss-server[bench]'" in capsys.readouterr().err


def test_plot(server: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    assert command.main(["--target", server.target, *_FAST, "--concurrency", "1,2", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_has_a_valid_request(server: Any, loss: str) -> None:
    shape = "x".join(map(str, ENTRIES[loss].batched))
    assert command.main(["--target", server.target, "--loss", loss, "--shape", shape, "--grad",
                        "--requests", "1", "--concurrency", "1", "--warmup", "0", "--quiet"]) == 0


def test_shapes() -> None:
    assert bench_payload.parse_shape("1000") == (1000,)
    assert bench_payload.parse_shape("64x1000") == (64, 1000)
    assert bench_payload.parse_shape("") == ()
    with pytest.raises(ValueError, match="joined by 'x'"):
        bench_payload.parse_shape("64,1000")


def test_progress_bar_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = Progress(stream)
        bar.show(0.5, "concurrency 4: 10 requests")
        bar.clear()
    assert "\r[###############...............]  50.0% concurrency 4: 10 requests" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r") and pipe.getvalue() == ""


def test_stream_mode(server: Any, tmp_path: Path) -> None:
    status, report = _bench_json(server, tmp_path, "--mode", "stream", "--concurrency", "1,5", "--streams", "2")
    assert status == 0
    assert report["mode"] == "stream" and report["streams"] == 2 and report["response_bytes"] > 0
    assert [(level["concurrency"], level["requests"], level["errors"]) for level in report["levels"]] == [
        (1, 6, 0), (5, 6, 0)]


def test_stream_mode_rejected_request(server: Any, tmp_path: Path) -> None:
    status, report = _bench_json(server, tmp_path, "--mode", "stream", "--loss", "multi_margin_loss",
                                 "--shape", "2x3x4")
    assert status == 1 and report["error"].startswith("INVALID_ARGUMENT: multi_margin_loss")


@pytest.mark.parametrize("item_id", [0, 1, 300, 2**40])
def test_stream_wire_helpers(item_id: int) -> None:
    from remoteloss_bench.load import stream_answer, stream_item
    from remoteloss.v1 import loss_pb2 as pb

    request = pb.ComputeRequest(mse_loss=pb.MseLoss())
    parsed = pb.ComputeStreamRequest.FromString(stream_item(request.SerializeToString(), item_id))
    assert parsed.id == item_id and parsed.request == request
    answer = pb.ComputeStreamResponse(id=item_id, response=pb.ComputeResponse(loss=pb.Tensor(data=b"\x08" * 9)))
    assert stream_answer(answer.SerializeToString()) == (item_id, None)
    error = pb.ComputeStreamResponse(id=item_id, error=pb.Error(code=3, message="bad"))
    assert stream_answer(error.SerializeToString()) == (item_id, ("INVALID_ARGUMENT", "bad"))
