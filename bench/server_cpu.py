"""Server CPU time per request under 64 callers: remoteloss against the echo and floor servers.

    python bench/server_cpu.py [--rounds 2] [--duration 4]

Throughput alone mixes the server's cost with the client's (both share the machine); this reads
the server processes' own CPU time (user + system, every thread: gRPC's poller and the compute
threads too) around one ``remoteloss bench --concurrency 64`` level of small forward requests,
and prints it per request, round by round, with the cores the server kept busy meanwhile (its CPU
seconds per second: throughput is CPU per request divided into those, so a server that gets less
of the machine than the echo answers less even at the same cost). What remoteloss costs beyond the floor server is its
own Python path; what the floor costs beyond the echo is parsing, decoding and torch. Where
gRPC's C++ library is installed (``apt-get install libgrpc++-dev``), the same echo in C++
(``native_echo.cc``) shows what the transport costs without Python: the room the native front
(remoteloss's default where it was built) has; ``remoteloss-python-front`` is the same server on
grpc.aio's front, ``remoteloss-no-templates`` the same server parsing and checking every request
whole (``--request-templates 0``). ``remoteloss-tls`` and ``remoteloss-python-front-tls`` are both over TLS (a
self-signed certificate that ``openssl`` makes; skipped without it); their ratio to the echo,
which is plaintext, includes what TLS costs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from servers import Client, Fleet, Server, native_echo_binary, self_signed

from remoteloss_server import native_front


def _cpu_seconds(server: Server) -> float:
    ticks = 0
    for pid in server.pids():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
    return ticks / os.sysconf("SC_CLK_TCK")


def _tls_servers(folder: Path) -> list[Server]:
    """remoteloss over TLS on each front, with a self-signed certificate; none without openssl."""
    made = self_signed(folder)
    if made is None:
        print("the TLS rows skipped: no openssl to make a certificate")
        return []
    cert, key = made
    servers = []
    for name, front in (("remoteloss-tls", "auto"), ("remoteloss-python-front-tls", "python")):
        server = Server.remoteloss(name, ["--front", front, "--tls-cert", str(cert), "--tls-key", str(key)], logs=folder)
        server.tls_ca = cert
        servers.append(server)
    return servers


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    client = Client()
    with tempfile.TemporaryDirectory(prefix="remoteloss-cpu-") as folder, Fleet() as fleet:
        logs = Path(folder)
        servers = [
            Server.echo_server("echo", logs=logs),
            Server.floor_server("floor-inline", logs=logs),
            Server.remoteloss("remoteloss", logs=logs),  # the default front: native where built
            Server.remoteloss("remoteloss-no-templates", ["--request-templates", "0"], logs=logs),
            Server.remoteloss("remoteloss-python-front", ["--front", "python"], logs=logs),
        ]
        if not native_front.available():
            print("remoteloss runs grpc.aio's front: the native front was not built (README, \"The gRPC front\")")
        servers += _tls_servers(logs)
        native = native_echo_binary()
        if native is None:
            print("echo-c++ skipped: gRPC's C++ library is not installed (apt-get install libgrpc++-dev)")
        else:
            servers.insert(1, Server.native_echo("echo-c++", native, logs=logs))
        fleet.start(*servers)
        for server in servers:
            client.bench(server, duration_s=1.0)  # warm up: first requests, torch's first call
        print("round  server                        req/s   server CPU us/request   / echo's   cores")
        for round_ in range(1, args.rounds + 1):
            echo = None
            for server in servers:
                before = _cpu_seconds(server)
                level = client.bench(server, concurrency=64, duration_s=args.duration, warmup_s=0)["level"]
                # The level counts requests in its window; a few in flight at its edges are not counted.
                spent = _cpu_seconds(server) - before
                cost = spent / max(level["requests"], 1) * 1e6
                echo = echo or cost  # the first server is the echo
                print(f"{round_:5d}  {server.name:28s} {level['throughput_rps']:6.0f}   {cost:8.0f}"
                      f"               {cost / echo:5.2f}    {spent / level['duration_s']:5.2f}")


if __name__ == "__main__":
    main()
