"""ServerConfig.validate and the CLI: flags, environment, precedence, one-line errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from remoteloss_server import app, cli
from remoteloss_server.config import ServerConfig

torch.set_num_threads(1)

ENV_NAMES = (
    "REMOTELOSS_HOST",
    "REMOTELOSS_PORT",
    "REMOTELOSS_DEVICE",
    "REMOTELOSS_TORCH_THREADS",
    "REMOTELOSS_COMPUTE_THREADS",
    "REMOTELOSS_MAX_MESSAGE_BYTES",
    "REMOTELOSS_LOG_LEVEL",
    "REMOTELOSS_GRACE_PERIOD",
    "REMOTELOSS_SHUTDOWN_GRACE_S",
    "REMOTELOSS_METRICS_PORT",
    "REMOTELOSS_METRICS_HOST",
    "REMOTELOSS_REFLECTION",
    "REMOTELOSS_WORKERS",
    "REMOTELOSS_BATCHING",
    "REMOTELOSS_MAX_BATCH_SIZE",
    "REMOTELOSS_MAX_BATCH_ELEMENTS",
    "REMOTELOSS_MAX_BATCH_DELAY",
    "REMOTELOSS_MAX_BATCH_DELAY_S",
)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """Replaces app.serve; collects the configs the CLI would have served."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    configs: list[ServerConfig] = []
    monkeypatch.setattr(app, "serve", configs.append)
    return configs


def test_defaults_match_the_design() -> None:
    config = ServerConfig()
    assert (config.host, config.port, config.device) == ("localhost", 50051, "auto")
    assert (config.torch_threads, config.compute_threads) == (1, 1)
    assert config.max_message_bytes == 512 * 1024 * 1024
    assert (config.log_level, config.shutdown_grace_s) == ("INFO", 10.0)
    config.validate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"host": ""}, "host"),
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"device": "gpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"compute_threads": 0}, "compute_threads"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"max_message_bytes": 2**31}, "max_message_bytes"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"shutdown_grace_s": -1.0}, "shutdown_grace_s"),
        ({"shutdown_grace_s": float("nan")}, "shutdown_grace_s"),
        ({"max_connections": 0}, "max_connections"),
        ({"connection_idle_s": -1.0}, "connection_idle_s"),
        ({"connection_idle_s": float("inf")}, "connection_idle_s"),
        ({"connection_idle_s": float("nan")}, "connection_idle_s"),
        ({"busy_poll_us": -1}, "busy_poll_us"),
        ({"busy_poll_us": 100_001}, "busy_poll_us"),
        ({"request_templates": -1}, "request_templates"),
        ({"request_templates": 4097}, "request_templates"),
        ({"front": "rust"}, "front"),
    ],
)
def test_validate_rejects_with_one_line_naming_the_setting(change: dict[str, Any], setting: str) -> None:
    with pytest.raises(ValueError) as info:
        ServerConfig(**change).validate()
    message = str(info.value)
    assert message.startswith(setting) and "\n" not in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_validate_accepts_devices(device: str) -> None:
    ServerConfig(device=device).validate()


def test_no_arguments_serve_the_defaults(served: list[ServerConfig]) -> None:
    assert cli.main([]) == 0
    assert served == [ServerConfig()]


def test_every_flag(served: list[ServerConfig]) -> None:
    argv = [
        "--host=127.0.0.1",
        "--port=0",
        "--device=cpu",
        "--torch-threads=4",
        "--compute-threads=2",
        "--max-message-bytes=1024",
        "--log-level=debug",
        "--grace-period=2.5",
    ]
    assert cli.main(argv) == 0
    assert served == [
        ServerConfig(
            host="127.0.0.1",
            port=0,
            device="cpu",
            torch_threads=4,
            compute_threads=2,
            max_message_bytes=1024,
            log_level="DEBUG",
            shutdown_grace_s=2.5,
        )
    ]


def test_environment_and_flag_precedence(served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTELOSS_PORT", "6000")
    monkeypatch.setenv("REMOTELOSS_COMPUTE_THREADS", "3")
    monkeypatch.setenv("REMOTELOSS_SHUTDOWN_GRACE_S", "1.5")
    assert cli.main(["--port", "7000"]) == 0
    assert served[0].port == 7000  # the flag wins
    assert served[0].compute_threads == 3
    assert served[0].shutdown_grace_s == 1.5


def test_grace_period_env_spelled_like_the_flag(served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTELOSS_GRACE_PERIOD", "4")
    assert cli.main([]) == 0
    assert served[0].shutdown_grace_s == 4.0


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "eighty"], {}, "--port"),
        (["--bogus"], {}, "--bogus"),
        (["--port", "70000"], {}, "port"),
        (["--device", "tpu"], {}, "device"),
        ([], {"REMOTELOSS_TORCH_THREADS": "many"}, "REMOTELOSS_TORCH_THREADS"),
        ([], {"REMOTELOSS_LOG_LEVEL": "chatty"}, "log_level"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    served: list[ServerConfig],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    needle: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("remoteloss-server: error: ") and needle in err
    assert served == []


def test_startup_failure_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(config: ServerConfig) -> None:
        raise app.StartupError("device cuda:0: CUDA is not available")

    monkeypatch.setattr(app, "serve", fail)
    assert cli.main(["--device", "cuda"]) == 1
    assert capsys.readouterr().err == "remoteloss-server: error: device cuda:0: CUDA is not available\n"


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--device",
        "--torch-threads",
        "--compute-threads",
        "--max-message-bytes",
        "--log-level",
        "--grace-period",
        "--workers",
    ):
        assert flag in out


def test_operations_defaults() -> None:
    config = ServerConfig()
    assert (config.metrics_port, config.metrics_host, config.reflection) == (9464, None, True)


@pytest.mark.parametrize(
    ("change", "setting"), [({"metrics_port": -1}, "metrics_port"), ({"metrics_port": 65536}, "metrics_port"),
                            ({"metrics_host": ""}, "metrics_host")]
)
def test_validate_rejects_operations_settings(change: dict[str, Any], setting: str) -> None:
    with pytest.raises(ValueError, match=f"^{setting}"):
        ServerConfig(**change).validate()


def test_operations_flags(served: list[ServerConfig]) -> None:
    assert cli.main(["--metrics-port=9100", "--metrics-host=127.0.0.1", "--no-reflection"]) == 0
    assert served[-1] == ServerConfig(metrics_port=9100, metrics_host="127.0.0.1", reflection=False)
    assert cli.main(["--metrics-port", "0"]) == 0
    assert served[-1].metrics_port == 0 and served[-1].reflection is True


@pytest.mark.parametrize(("text", "on"), [("false", False), ("0", False), ("off", False), ("True", True), ("1", True)])
def test_operations_environment(
    served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch, text: str, on: bool
) -> None:
    monkeypatch.setenv("REMOTELOSS_METRICS_PORT", "9200")
    monkeypatch.setenv("REMOTELOSS_METRICS_HOST", "::1")
    monkeypatch.setenv("REMOTELOSS_REFLECTION", text)
    assert cli.main([]) == 0
    assert (served[-1].metrics_port, served[-1].metrics_host, served[-1].reflection) == (9200, "::1", on)
    assert cli.main(["--metrics-port=9300", "--no-reflection"]) == 0  # a flag wins
    assert (served[-1].metrics_port, served[-1].reflection) == (9300, False)


def test_a_bad_reflection_value_exits_2(
    served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REMOTELOSS_REFLECTION", "maybe")
    assert cli.main([]) == 2
    assert "REMOTELOSS_REFLECTION" in capsys.readouterr().err and served == []


def test_help_lists_operations_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--metrics-port", "--metrics-host", "--no-reflection", "REMOTELOSS_METRICS_PORT", "default 9464"):
        assert flag in out


def test_batching_defaults() -> None:
    config = ServerConfig()
    assert (config.batching, config.max_batch_size, config.max_batch_elements) == (True, 64, 0)
    assert config.max_batch_delay_s == 0.0


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_elements": -1}, "max_batch_elements"),
        ({"max_batch_delay_s": -0.001}, "max_batch_delay_s"),
        ({"max_batch_delay_s": 2.0}, "max_batch_delay_s"),
        ({"max_batch_delay_s": float("inf")}, "max_batch_delay_s"),
    ],
)
def test_validate_rejects_batching_settings(change: dict[str, Any], setting: str) -> None:
    with pytest.raises(ValueError, match=f"^{setting}"):
        ServerConfig(**change).validate()


def test_batching_flags_and_environment(served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--no-batching", "--max-batch-size=8", "--max-batch-elements=1000", "--max-batch-delay=0.005"]
    assert cli.main(argv) == 0
    expected = ServerConfig(batching=False, max_batch_size=8, max_batch_elements=1000, max_batch_delay_s=0.005)
    assert served[-1] == expected
    monkeypatch.setenv("REMOTELOSS_BATCHING", "off")
    monkeypatch.setenv("REMOTELOSS_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("REMOTELOSS_MAX_BATCH_DELAY_S", "0.01")
    assert cli.main([]) == 0
    assert (served[-1].batching, served[-1].max_batch_size, served[-1].max_batch_delay_s) == (False, 16, 0.01)
    monkeypatch.setenv("REMOTELOSS_MAX_BATCH_DELAY", "0.02")  # spelled like the flag, it wins over the alias
    assert cli.main(["--batching"]) == 0  # a flag wins over the environment
    assert (served[-1].batching, served[-1].max_batch_delay_s) == (True, 0.02)


def test_tenant_weights_from_the_flag_and_the_environment(
    served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REMOTELOSS_TENANT_WEIGHTS", raising=False)
    assert cli.main(["--tenant-weights", "alice=3, bob=0.5,"]) == 0
    assert served[-1].tenant_weights == (("alice", 3.0), ("bob", 0.5))
    monkeypatch.setenv("REMOTELOSS_TENANT_WEIGHTS", "carol=2")
    assert cli.main([]) == 0
    assert served[-1].tenant_weights == (("carol", 2.0),)
    assert ServerConfig().tenant_weights == ()


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--tenant-weights", "alice"], None, "--tenant-weights: tenant_weights: 'alice' is not tenant=weight"),
        ([], "alice=three", "REMOTELOSS_TENANT_WEIGHTS: tenant_weights: 'alice=three' is not tenant=weight"),
        (["--tenant-weights", "alice=0"], None, "tenant_weights: the weight of alice must be a finite number > 0"),
        (["--tenant-weights", "alice=inf"], None, "tenant_weights: the weight of alice must be a finite number > 0"),
        (["--tenant-weights", "a=1,a=2"], None, "tenant_weights: a is listed twice"),
        (["--tenant-weights", "al ice=1"], None, "tenant_weights: 'al ice' is not a tenant name"),
    ],
)
def test_bad_tenant_weights_exit_2_with_one_line(
    served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str], env: str | None, needle: str,
) -> None:
    monkeypatch.delenv("REMOTELOSS_TENANT_WEIGHTS", raising=False)
    if env is not None:
        monkeypatch.setenv("REMOTELOSS_TENANT_WEIGHTS", env)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and served == []


def test_help_names_tenant_weights_and_sighup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--tenant-weights" in out and "REMOTELOSS_TENANT_WEIGHTS" in out and "default 1 for every tenant" in out
    assert "SIGHUP reads the API keys" in out


def test_help_shows_no_default_for_a_setting_unset_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "None" not in out
    assert "(env REMOTELOSS_METRICS_HOST)" in " ".join(out.split())
    assert "default localhost" in " ".join(out.split())  # the --host default: loopback only
