"""The `remoteloss` command line without a server: parsing, option types, the command table."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import remoteloss
from remoteloss import cli
from remoteloss._commands import compute
from remoteloss.v1 import loss_pb2 as pb


@pytest.fixture
def arrays(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name, array in {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3),
        "classes": np.array([0, 2]),
        "npz": None,
    }.items():
        path = tmp_path / f"{name}.npy"
        if array is None:
            path = tmp_path / "several.npz"
            np.savez(path, a=np.zeros(2), b=np.ones(2))
        else:
            np.save(path, array)
        paths[name] = str(path)
    return paths


def test_options_are_read_by_their_proto_type(arrays: dict[str, str]) -> None:
    request, wrt = compute.build_request(
        "cross_entropy",
        [f"input={arrays['x']}", f"target={arrays['classes']}"],
        ["reduction=sum", "ignore_index=-1", "label_smoothing=0.25", "size_average=false"],
        [],
    )
    message = request.cross_entropy
    assert wrt == ("input",)  # a bare --grad: the first tensor argument
    assert message.reduction == pb.REDUCTION_SUM
    assert message.ignore_index == -1 and message.label_smoothing == 0.25
    assert message.HasField("size_average") and not message.size_average
    assert not message.HasField("reduce")
    assert message.input.requires_grad and not message.target.requires_grad
    assert message.input.dtype == pb.DTYPE_FLOAT32 and list(message.input.shape) == [2, 3]
    assert message.target.dtype == pb.DTYPE_INT64


@pytest.mark.parametrize("text", ["batchmean", "REDUCTION_BATCHMEAN", "BatchMean"])
def test_enum_values_by_name_with_or_without_prefix(arrays: dict[str, str], text: str) -> None:
    request, _ = compute.build_request("kl_div", [f"input={arrays['x']}"], [f"reduction={text}"], None)
    assert request.kl_div.reduction == pb.REDUCTION_BATCHMEAN


def test_message_options_take_protobuf_json(arrays: dict[str, str]) -> None:
    request, wrt = compute.build_request(
        "triplet_margin_with_distance_loss",
        [f"anchor={arrays['x']}", f"positive={arrays['x']}", f"negative={arrays['x']}"],
        ['distance_function={"cosine_distance": {"dim": 1}}', "swap=yes", "margin=inf"],
        ["positive", "anchor"],
    )
    message = request.triplet_margin_with_distance_loss
    assert message.distance_function.WhichOneof("kind") == "cosine_distance"
    assert message.distance_function.cosine_distance.dim == 1
    assert message.swap and message.margin == float("inf")
    assert wrt == ("positive", "anchor")


def test_grad_output_is_sent(arrays: dict[str, str]) -> None:
    request, wrt = compute.build_request("mse_loss", [f"input={arrays['x']}"], [], None, arrays["x"])
    assert wrt == () and request.HasField("grad_output")


@pytest.mark.parametrize(
    ("loss", "tensors", "options", "grad", "message"),
    [
        ("nope", [], [], None, "unknown loss 'nope'"),
        ("mse_loss", ["input"], [], None, "--arg: expected NAME=VALUE"),
        ("mse_loss", ["weights=x.npy"], [], None, "--arg: no argument 'weights'"),
        ("mse_loss", ["input=x", "input=x"], [], None, "input is given twice"),
        ("mse_loss", ["input=missing.npy"], [], None, "input: cannot read missing.npy"),
        ("mse_loss", ["input=NPZ"], [], None, "holds several arrays"),
        ("mse_loss", [], ["input=1"], None, "--opt: no argument 'input'"),
        ("mse_loss", [], ["reduction=average"], None, "expected one of none, mean, sum, batchmean"),
        ("mse_loss", [], ["reduce=maybe"], None, "expected true or false"),
        ("cross_entropy", [], ["ignore_index=1.5"], None, "expected an integer"),
        ("cross_entropy", [], ["ignore_index=99999999999999999999"], None, "--opt ignore_index:"),
        ("cross_entropy", [], ["label_smoothing=a"], None, "expected a number"),
        ("triplet_margin_with_distance_loss", [], ["distance_function={"], None, "as JSON"),
        ("mse_loss", [], [], ["var"], "--grad: mse_loss has no tensor argument 'var'"),
        ("mse_loss", [], [], ["input"], "--grad input: give input with --arg"),
        ("cross_entropy", ["input=X", "target=CLASSES"], [], ["target"], "int64 tensors have no gradient"),
    ],
)
def test_bad_usage_is_a_usage_error(
    arrays: dict[str, str], loss: str, tensors: list[str], options: list[str], grad: list[str] | None, message: str
) -> None:
    tensors = [t.replace("=x", f"={arrays['x']}").replace("=X", f"={arrays['x']}")
               .replace("=CLASSES", f"={arrays['classes']}").replace("=NPZ", f"={arrays['npz']}") for t in tensors]
    with pytest.raises(cli.UsageError, match=None) as caught:
        compute.build_request(loss, tensors, options, grad)
    assert message in str(caught.value)


def test_usage_errors_exit_2_with_the_message_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compute", "nope"]) == 2
    assert "remoteloss: unknown loss 'nope'" in capsys.readouterr().err
    assert cli.main(["--timeout", "0", "health"]) == 2
    assert "must be a positive number" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("losses", "compute", "health", "bench"):
        assert name in out
    assert cli.main(["compute", "--help"]) == 0
    assert "--opt NAME=VALUE" in capsys.readouterr().out


def test_bench_comes_from_the_server_distribution_by_module_name() -> None:
    assert "bench" not in cli.COMMANDS  # the SDK's distribution holds no load generator
    assert cli.commands()["bench"].module == "remoteloss_bench.command"


@pytest.mark.parametrize("module", ["remoteloss.cli", "remoteloss_bench"])
def test_bench_runs_as_a_module(module: str) -> None:
    """bench/servers.py runs `python -m remoteloss.cli ... bench`: there the CLI is __main__."""
    done = subprocess.run([sys.executable, "-m", module, *(["bench"] if module == "remoteloss.cli" else []), "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--concurrency" in done.stdout


def test_a_broken_command_entry_point_leaves_the_others_working(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        name = "broken"

        def load(self) -> Any:
            raise ImportError("broken plugin")

    class Other:
        name = "other"

        def load(self) -> Any:
            return "not a Command"

    monkeypatch.setattr(cli.metadata, "entry_points", lambda group: [Broken(), Other()])
    assert cli.commands() == cli.COMMANDS


def fake_command(status: int) -> types.ModuleType:
    module = types.ModuleType("fake_command")
    module.add_arguments = lambda parser: parser.add_argument("--count", type=int, default=1)  # type: ignore[attr-defined]

    def run(args: Any) -> int:
        print(f"count={args.count} target={args.target} timeout={args.timeout}")
        return status

    module.run = run  # type: ignore[attr-defined]
    return module


def test_a_command_module_is_imported_only_when_it_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("fake_command", "a test command"))
    monkeypatch.setitem(cli.COMMANDS, "absent", cli.Command("no_such_module_here", "never installed"))
    monkeypatch.setitem(sys.modules, "fake_command", fake_command(3))
    monkeypatch.delenv("REMOTELOSS_TARGET", raising=False)

    assert cli.main(["--help"]) == 0  # lists "absent" without importing it
    assert "never installed" in capsys.readouterr().out
    assert cli.main(["fake", "--count", "7", "--timeout", "2.5"]) == 3
    assert capsys.readouterr().out == "count=7 target=localhost:50051 timeout=2.5\n"
    monkeypatch.setenv("REMOTELOSS_TARGET", "example:1")
    assert cli.main(["--target", "other:2", "fake"]) == 3
    assert "target=other:2" in capsys.readouterr().out
    assert cli.main(["fake"]) == 3
    assert "target=example:1" in capsys.readouterr().out
    assert cli.main(["absent"]) == 2
    assert "the absent command is not part of this installation" in capsys.readouterr().err


def test_a_command_needing_an_absent_package_says_which(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def load(self: cli.Command) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'somepackage'", name="somepackage")

    monkeypatch.setitem(cli.COMMANDS, "needy", cli.Command("needy_command", "needs a package"))
    monkeypatch.setattr(cli.Command, "load", load)
    assert cli.main(["needy"]) == 2
    assert "the needy command needs 'somepackage', which is not installed" in capsys.readouterr().err


def test_the_command_word_is_found_past_option_values() -> None:
    assert cli._command_word(["--target", "losses", "health"]) == "health"
    assert cli._command_word(["--timeout=3", "compute", "mse_loss"]) == "compute"
    assert cli._command_word(["--", "health"]) is None
    assert cli._command_word(["nope"]) is None


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"remoteloss {remoteloss.__version__}\n"


@pytest.mark.parametrize("command", [[], *([name] for name in cli.commands())])
def test_help_shows_no_default_for_an_unset_option(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*command, "--help"]) == 0
    assert "None" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "loss", "grad"),
    [
        (["compute", "--grad", "input", "target", "mse_loss", "--arg", "input=x.npy"], "mse_loss", ["input", "target"]),
        (["compute", "--grad", "mse_loss", "--arg", "input=x.npy"], "mse_loss", []),  # bare --grad
        (["compute", "mse_loss", "--grad", "input", "target"], "mse_loss", ["input", "target"]),
        (["compute", "--arg", "input=x.npy", "mse_loss"], "mse_loss", None),
        (["--target", "h:1", "compute", "--grad", "input", "l1_loss"], "l1_loss", ["input"]),
    ],
)
def test_grad_names_never_take_the_loss(
    argv: list[str], loss: str, grad: list[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, list[str] | None]] = []

    def build_request(loss: str, tensors: list[str], options: list[str], grad: Any, grad_output: Any = None) -> Any:
        seen.append((loss, grad))
        raise cli.UsageError("stop here")

    monkeypatch.setattr(compute, "build_request", build_request)
    assert cli.main(argv) == 2
    assert seen == [(loss, grad)]


def test_compute_without_a_loss_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compute", "--grad", "input", "--arg", "input=x.npy"]) == 2
    assert "LOSS is required" in capsys.readouterr().err
