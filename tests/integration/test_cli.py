"""The `remoteloss` command line against the test server: main() in-process, and once as
the installed console script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from remoteloss import cli
from tests import tools
from tests.catalog import LOSS_NAMES


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    generator = np.random.default_rng(1)
    arrays = {
        "input": generator.standard_normal((4, 3)).astype(np.float32),
        "target": generator.standard_normal((4, 3)).astype(np.float32),
        "classes": np.array([0, 2, 1, 2]),
    }
    paths = {}
    for name, array in arrays.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    return paths


def test_losses_table(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", server.target, "losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["LOSS", "TORCH.NN"]
    assert [line.split()[0] for line in lines[1:]] == list(LOSS_NAMES)
    assert lines[3].split()[:5] == ["cross_entropy", "CrossEntropyLoss", "input,", "target,", "[weight]"]
    assert "size_average" not in lines[3]  # deprecated options are left out of the table


def test_losses_json_and_one_loss(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", server.target, "losses", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [loss["name"] for loss in document][:2] == ["l1_loss", "mse_loss"]
    assert document[1]["message_type"] == "remoteloss.v1.MseLoss"
    assert cli.main(["--target", server.target, "losses", "huber_loss"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("huber_loss (torch.nn.HuberLoss)") and "delta: double, default 1.0" in out
    assert cli.main(["--target", server.target, "losses", "nope"]) == 2
    assert "the server has no loss 'nope'" in capsys.readouterr().err


def test_compute_prints_the_loss_and_writes_gradients(
    server: Any, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "grads"
    status = cli.main([
        "compute", "mse_loss", "--target", server.target,
        "--arg", f"input={files['input']}", "--arg", f"target={files['target']}",
        "--opt", "reduction=sum", "--grad", "input", "target", "--out-dir", str(out_dir),
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    input = torch.from_numpy(np.load(files["input"])).requires_grad_()
    target = torch.from_numpy(np.load(files["target"])).requires_grad_()
    expected = F.mse_loss(input, target, reduction="sum")
    expected.backward()
    assert float(captured.out) == pytest.approx(expected.item(), rel=1e-6)
    assert sorted(p.name for p in out_dir.iterdir()) == ["grad_input.npy", "grad_target.npy"]
    torch.testing.assert_close(torch.from_numpy(np.load(out_dir / "grad_input.npy")), input.grad)
    torch.testing.assert_close(torch.from_numpy(np.load(out_dir / "grad_target.npy")), target.grad)


def test_compute_json_with_options_and_warnings(
    server: Any, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main([
        "--target", server.target, "compute", "cross_entropy",
        "--arg", f"input={files['input']}", "--arg", f"target={files['classes']}",
        "--opt", "reduction=none", "--opt", "label_smoothing=0.2", "--opt", "ignore_index=1",
        "--grad", "--out-dir", str(tmp_path), "--json",
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    answer = json.loads(captured.out)
    input = torch.from_numpy(np.load(files["input"])).requires_grad_()
    expected = F.cross_entropy(input, torch.from_numpy(np.load(files["classes"])), reduction="none",
                               label_smoothing=0.2, ignore_index=1)
    expected.sum().backward()
    assert answer["dtype"] == "float32" and answer["shape"] == [4] and answer["warnings"] == []
    torch.testing.assert_close(torch.tensor(answer["loss"]), expected.detach())
    assert answer["gradients"] == {"input": str(tmp_path / "grad_input.npy")}
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "grad_input.npy")), input.grad)

    # torch's warning (a broadcast target) goes to stderr; the value still prints.
    np.save(tmp_path / "row.npy", np.zeros(3, np.float32))
    status = cli.main(["--target", server.target, "compute", "mse_loss",
                       "--arg", f"input={files['input']}", "--arg", f"target={tmp_path / 'row.npy'}"])
    captured = capsys.readouterr()
    assert status == 0
    assert "remoteloss: warning: Using a target size" in captured.err
    assert float(captured.out) == pytest.approx(float(np.mean(np.load(files["input"]) ** 2)), rel=1e-6)


def test_a_server_error_exits_1_with_its_message(
    server: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(files["classes"], np.array([0, 2, 7, 1]))
    status = cli.main(["--target", server.target, "compute", "cross_entropy",
                       "--arg", f"input={files['input']}", "--arg", f"target={files['classes']}"])
    assert status == 1
    assert capsys.readouterr().err.startswith("remoteloss: INVALID_ARGUMENT: cross_entropy: target holds class 7")


def test_health(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", server.target, "health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert cli.main(["--target", server.target, "health", "--service", "remoteloss.v1.LossService"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert cli.main(["--target", server.target, "health", "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().out == "SERVICE_UNKNOWN\n"


def test_no_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", "127.0.0.1:1", "--timeout", "2", "health"]) == 1
    assert capsys.readouterr().err.startswith("remoteloss: UNAVAILABLE: ")


def test_the_installed_script(server: Any, files: dict[str, Path]) -> None:
    script = tools.find("remoteloss", "pip install -e ./client puts the console script next to python")
    result = tools.run(
        [script, "compute", "huber_loss", "--arg", f"input={files['input']}", "--arg", f"target={files['target']}",
         "--opt", "delta=0.5", "--json"],
        env={"REMOTELOSS_TARGET": server.target},
    )
    assert result.returncode == 0, result.stderr
    expected = F.huber_loss(torch.from_numpy(np.load(files["input"])), torch.from_numpy(np.load(files["target"])),
                            delta=0.5)
    assert json.loads(result.stdout)["loss"] == pytest.approx(expected.item(), rel=1e-6)
