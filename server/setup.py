"""The native front's extension, ``remoteloss_server._front`` (native/: front.cc, the Python type;
front.h, the transport; acceptor.h, the connections), built where gRPC's
C++ library and pkg-config are installed (Debian: ``apt-get install libgrpc++-dev pkg-config g++``).
Without them the distribution installs without it, and the server runs grpc.aio's front
(``--front auto``; ``--front native`` then refuses to start). Everything else is pyproject.toml's."""

from __future__ import annotations

import subprocess
import sys

from setuptools import Extension, setup


def _pkg_config(*args: str) -> list[str] | None:
    try:
        done = subprocess.run(["pkg-config", *args, "grpc++"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.split()


def _extensions() -> list[Extension]:
    cflags, libs = _pkg_config("--cflags"), _pkg_config("--libs")
    if cflags is None or libs is None:
        print("remoteloss-server: gRPC's C++ library (pkg-config grpc++) not found: no native front", file=sys.stderr)
        return []
    return [
        Extension(
            "remoteloss_server._front",
            ["native/front.cc"],
            depends=["native/front.h", "native/acceptor.h"],
            extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", *cflags],
            extra_link_args=libs,
            language="c++",
            optional=True,  # a failed build leaves the server on grpc.aio's front, with a warning
        )
    ]


setup(ext_modules=_extensions())
