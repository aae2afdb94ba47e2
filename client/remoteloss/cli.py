"""``remoteloss``: the command line of the client (list losses, compute one, check health).

Each subcommand is a module named in ``COMMANDS`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). A module is imported only
when its command runs (or its ``--help`` is asked for), so a command whose module is missing or
needs an absent package leaves the others working. ``args.target`` and ``args.timeout`` are set
for every command. ``run`` raises ``UsageError`` for bad usage (exit 2); a
``remoteloss.LossServiceError`` it lets through prints the server's status and message (exit 1).
torch is never needed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from remoteloss._errors import LossServiceError

__all__ = ["COMMANDS", "Command", "UsageError", "main"]

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0


class UsageError(Exception):
    """Bad usage of a command: the message goes to stderr, and the exit status is 2."""


@dataclass(frozen=True)
class Command:
    """One subcommand: ``module`` has ``add_arguments(parser)`` and ``run(args) -> int``."""

    module: str
    help: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


COMMANDS: dict[str, Command] = {
    "losses": Command("remoteloss._commands.losses", "list the losses the server offers"),
    "compute": Command("remoteloss._commands.compute", "compute one loss (and gradients) from .npy files"),
    "health": Command("remoteloss._commands.health", "check the server's health (exit 0 when SERVING)"),
    "bench": Command("remoteloss._bench", "measure the server's latency and throughput"),
}

# Options taking a value, for finding the command word in argv before parsing.
_VALUE_OPTIONS = ("--target", "--timeout")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 server error, 2 bad usage)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    name = _command_word(arguments)
    module = None
    if name is not None:
        try:
            module = COMMANDS[name].load()
        except ModuleNotFoundError as exc:
            if exc.name == COMMANDS[name].module:
                return _fail(f"the {name} command is not part of this installation", 2)
            return _fail(f"the {name} command needs {exc.name!r}, which is not installed", 2)
    parser = _parser(name, module)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    if module is None:  # unreachable: argparse requires a command
        parser.print_usage(sys.stderr)
        return 2
    try:
        status: int = module.run(args)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except LossServiceError as exc:
        return _fail(f"{exc.code.name}: {exc.details}", 1)
    except KeyboardInterrupt:
        return 130
    return status


def _parser(selected: str | None, module: ModuleType | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remoteloss",
        description="Call a remoteloss server: list its losses, compute one, check its health.",
    )
    _connection_arguments(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        # Accepted after the command word too; the defaults come from the main parser.
        _connection_arguments(sub, suppress=True)
        if name == selected and module is not None:
            module.add_arguments(sub)
    return parser


def _connection_arguments(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    target = argparse.SUPPRESS if suppress else os.environ.get("REMOTELOSS_TARGET") or DEFAULT_TARGET
    timeout = argparse.SUPPRESS if suppress else DEFAULT_TIMEOUT_S
    parser.add_argument(
        "--target",
        default=target,
        help=f"server address, HOST:PORT (default: $REMOTELOSS_TARGET, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=timeout,
        metavar="SECONDS",
        help=f"deadline of each call in seconds (default: {DEFAULT_TIMEOUT_S:g})",
    )


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _command_word(arguments: Sequence[str]) -> str | None:
    """The first positional argument when it names a command (options and their values skipped)."""
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--":
            return None
        elif argument in _VALUE_OPTIONS:
            skip = True
        elif not argument.startswith("-"):
            return argument if argument in COMMANDS else None
    return None


def _fail(message: str, status: int) -> int:
    print(f"remoteloss: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
