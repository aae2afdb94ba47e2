"""Readers for the deployment files (Dockerfile, nginx.conf), shared by the deployment tests.

No Docker engine runs here, so the tests read these files and run what they describe with the
programs that do exist: the server itself, hadolint, promtool, nginx and Compose's config check.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .. import tools
from ..bench_modules import load

DOCKERFILE = tools.ROOT / "Dockerfile"
NGINX_CONF = tools.ROOT / "deploy" / "nginx" / "nginx.conf"
# The one upstream line of nginx.conf that names the replicas; each test rewrites it.
UPSTREAM_LINE = re.compile(r"(?m)^(?P<indent>[ \t]*)server (?P<address>\S+)(?P<params>[^;\n]*);")
LISTEN_LINE = re.compile(r"(?m)^(?P<indent>[ \t]*)listen (?P<port>\d+) http2;")


def free_port() -> int:
    """A loopback port nothing listens on now, outside the ephemeral range (the benchmarks' own
    ``free_port``, bench/servers.py, which says why)."""
    return int(load("servers").free_port())


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined and comments dropped."""

    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> Dockerfile:
        logical: list[str] = []
        current = ""
        for raw in path.read_text().splitlines():
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            logical.append(current + stripped)
            current = ""
        assert not current, "the Dockerfile ends inside a continuation line"
        parsed = []
        for line in logical:
            keyword, _, rest = line.partition(" ")
            parsed.append((keyword.upper(), rest.strip()))
        return cls(parsed)

    def all(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
        return found[0]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for word in shlex.split(rest):
                name, sep, value = word.partition("=")
                assert sep, f"ENV {word!r}: use the NAME=value form"
                values[name] = value
        return values

    def cmd(self) -> list[str]:
        command = json.loads(self.one("CMD"))
        assert isinstance(command, list) and all(isinstance(w, str) for w in command), "CMD must be exec form"
        return command

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """The HEALTHCHECK options (``{"interval": "10s", ...}``) and its exec-form command."""
        options_text, sep, command_text = self.one("HEALTHCHECK").partition("CMD ")
        assert sep, "HEALTHCHECK without CMD"
        options = dict(option.removeprefix("--").split("=", 1) for option in options_text.split())
        command = json.loads(command_text)
        assert isinstance(command, list), "HEALTHCHECK CMD must be exec form"
        return options, command


def nginx_config(upstreams: list[str], listen: str, temp: Path) -> str:
    """deploy/nginx/nginx.conf with its replicas replaced by ``upstreams`` ("127.0.0.1:PORT") and
    its listen address by ``listen``; temporary files go under ``temp`` (so nginx needs no root)."""
    text = NGINX_CONF.read_text()
    servers = list(UPSTREAM_LINE.finditer(text))
    assert len(servers) == 1, "nginx.conf: expected one upstream `server` line; update this test with the config"
    listens = list(LISTEN_LINE.finditer(text))
    assert len(listens) == 1, "nginx.conf: expected one `listen PORT http2;` line; update this test with the config"
    line = servers[0]
    replaced = "\n".join(f"{line['indent']}server {address}{line['params']};" for address in upstreams)
    text = text[: line.start()] + replaced + text[line.end() :]
    text = LISTEN_LINE.sub(lambda m: f"{m['indent']}listen {listen} http2;", text)
    paths = "".join(f"\n    {name}_temp_path {temp / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return text.replace("http {", "http {" + paths, 1)


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
    if found is None:
        tools.missing("nginx is not installed (apt-get install nginx)")
    assert found is not None
    return found


@contextmanager
def running_nginx(upstreams: list[str], folder: Path) -> Iterator[Nginx]:
    """Debian's nginx on deploy/nginx/nginx.conf, in front of ``upstreams``, on a free loopback
    port, once it takes connections; stopped on exit. Skips (fails under CI) without nginx."""
    binary = nginx_binary()
    port = free_port()
    config = folder / "nginx.conf"
    config.write_text(nginx_config(upstreams, f"127.0.0.1:{port}", folder))
    globals_ = f"daemon off; pid {folder / 'nginx.pid'};"
    checked = tools.run([binary, "-t", "-c", str(config), "-g", globals_], timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = folder / "nginx.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([binary, "-c", str(config), "-g", globals_], stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        running = Nginx(process, port, log)
        with grpc.insecure_channel(running.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
