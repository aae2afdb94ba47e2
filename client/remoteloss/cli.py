"""``remoteloss``: the command line of the client (list losses, compute one, check health).

Each subcommand is a module named in ``COMMANDS``, or by another installed distribution (an entry
point in the group ``remoteloss.commands`` whose object is a ``Command``: ``remoteloss-server``
adds ``bench``, its load generator; see ``commands()``), with two functions,
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). A module is imported only
when its command runs (or its ``--help`` is asked for), so a command whose module is missing or
needs an absent package leaves the others working. ``args.target``, ``args.timeout`` and the
connection's security settings (``connection(args)``: API key and TLS) are set for every command. ``run`` raises ``UsageError`` for bad usage (exit 2); a
``remoteloss.LossServiceError`` it lets through prints the server's status and message (exit 1).
torch is never needed.
"""

from __future__ import annotations

import argparse
import importlib
import os
from importlib import metadata
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from remoteloss import __version__
from remoteloss._errors import LossServiceError

__all__ = ["COMMANDS", "COMMAND_GROUP", "Command", "UsageError", "commands", "connection", "main"]

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
}
# Entry points of other distributions that add a command: name = "package.module:Command object".
COMMAND_GROUP = "remoteloss.commands"


def commands() -> dict[str, Command]:
    """``COMMANDS``, then the commands installed distributions add (a built-in name wins; an entry
    point that fails to load or is no ``Command`` is left out, so it cannot break the others)."""
    found = dict(COMMANDS)
    for entry in metadata.entry_points(group=COMMAND_GROUP):
        if entry.name in found:
            continue
        try:
            command = entry.load()
        except Exception:  # noqa: BLE001 - a broken plugin must leave the built-in commands working
            continue
        # Read by its fields, not by isinstance: under `python -m remoteloss.cli` this module is
        # __main__, and the plugin's Command comes from a second copy of it.
        module, summary = getattr(command, "module", None), getattr(command, "help", None)
        if isinstance(module, str) and isinstance(summary, str):
            found[entry.name] = Command(module, summary)
    return found

# Options taking a value, for finding the command word in argv before parsing.
_VALUE_OPTIONS = ("--target", "--timeout", "--api-key", "--tls-ca", "--tls-cert", "--tls-key")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 server error, 2 bad usage)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    name = _command_word(arguments, table)
    module = None
    if name is not None:
        try:
            module = table[name].load()
        except ModuleNotFoundError as exc:
            if exc.name == table[name].module:
                return _fail(f"the {name} command is not part of this installation", 2)
            return _fail(f"the {name} command needs {exc.name!r}, which is not installed", 2)
    parser = _parser(table, name, module)
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


def _parser(table: dict[str, Command], selected: str | None, module: ModuleType | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remoteloss",
        description="Call a remoteloss server: list its losses, compute one, check its health.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection_arguments(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in table.items():
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
    unset = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--api-key",
        default=unset,
        metavar="KEY",
        help="API key, sent as 'authorization: Bearer KEY' (default: $REMOTELOSS_API_KEY, which keeps "
        "it out of the process list)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="connect with TLS, trusting the system's root certificates",
    )
    parser.add_argument("--tls-ca", default=unset, metavar="FILE", help="PEM CA certificates to trust (implies --tls)")
    parser.add_argument("--tls-cert", default=unset, metavar="FILE", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key", default=unset, metavar="FILE", help="PEM private key of --tls-cert")


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Client`` keyword arguments of the connection flags (API key, TLS), files read.

    Raises ``UsageError`` for an unreadable file, a certificate without its key, or an API key
    that would travel in plaintext to a non-loopback target.
    """
    from remoteloss._channel import api_key_metadata

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    files = {}
    for name, path in (("root_certificates", args.tls_ca), ("client_cert", args.tls_cert), ("client_key", args.tls_key)):
        try:
            files[name] = None if path is None else Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    tls = bool(args.tls or files["root_certificates"] is not None or files["client_cert"] is not None)
    try:
        api_key_metadata(args.target, args.api_key, secure=tls)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return {"api_key": args.api_key, "tls": tls, **files}


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _command_word(arguments: Sequence[str], table: dict[str, Command] | None = None) -> str | None:
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
            return argument if argument in (COMMANDS if table is None else table) else None
    return None


def _fail(message: str, status: int) -> int:
    print(f"remoteloss: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
