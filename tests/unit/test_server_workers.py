"""--workers: the setting, its checks, each worker's settings (tests/integration/test_workers.py runs them)."""

from __future__ import annotations

import pytest
import torch

from remoteloss_server import app, cli
from remoteloss_server.config import ServerConfig
from remoteloss_server.workers import worker_config

torch.set_num_threads(1)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    monkeypatch.delenv("REMOTELOSS_WORKERS", raising=False)
    monkeypatch.delenv("REMOTELOSS_PORT", raising=False)
    configs: list[ServerConfig] = []
    monkeypatch.setattr(app, "serve", configs.append)
    return configs


def test_default_is_one_process() -> None:
    assert ServerConfig().workers == 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"workers": 0}, "workers must be >= 1"),
        ({"workers": 2, "port": 0}, "workers > 1 needs an explicit port"),
        ({"workers": 3, "metrics_port": 65534}, "exceeds 65535"),
    ],
)
def test_validate_rejects(change: dict[str, int], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        ServerConfig(**change).validate()  # type: ignore[arg-type]
    assert str(info.value).startswith("workers")


def test_flag_and_environment(served: list[ServerConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["--workers", "4"]) == 0
    monkeypatch.setenv("REMOTELOSS_WORKERS", "3")
    assert cli.main([]) == 0
    assert cli.main(["--workers", "2"]) == 0  # the flag wins
    assert [c.workers for c in served] == [4, 3, 2]


def test_port_zero_with_workers_exits_2(served: list[ServerConfig], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--workers", "2", "--port", "0"]) == 2
    assert "workers > 1 needs an explicit port" in capsys.readouterr().err
    assert served == []


def test_a_failed_worker_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(config: ServerConfig) -> None:
        raise app.WorkerError("1 of 2 workers failed: worker-1 exited with status 1")

    monkeypatch.setattr(app, "serve", fail)
    assert cli.main(["--workers", "2"]) == 1
    assert capsys.readouterr().err == "remoteloss-server: error: 1 of 2 workers failed: worker-1 exited with status 1\n"


def test_each_worker_serves_metrics_on_its_own_port() -> None:
    config = ServerConfig(workers=3, metrics_port=9464)
    assert [worker_config(config, i).metrics_port for i in range(3)] == [9464, 9465, 9466]
    assert worker_config(ServerConfig(workers=3, metrics_port=0, http_port=0), 2).metrics_port == 0
    assert worker_config(config, 1).port == config.port


def test_server_thread_is_one_process() -> None:
    with pytest.raises(ValueError, match="workers"):
        app.ServerThread(ServerConfig(port=50051, workers=2))
