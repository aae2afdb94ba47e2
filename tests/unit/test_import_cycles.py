"""No import cycle among the project's modules, counting every import statement: at module level,
inside functions (a lazy import) and under ``if TYPE_CHECKING:``. Read from the source (AST), so
nothing is imported and a cycle that only a type checker would follow still counts."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "remoteloss": ROOT / "client" / "remoteloss",
    "remoteloss_server": ROOT / "server" / "remoteloss_server",
    "remoteloss_bench": ROOT / "server" / "remoteloss_bench",
}
# What the server may import of the SDK (HOUSE_STYLE §2): the codec, the wire framing, the stubs.
SHARED = {"remoteloss.codec", "remoteloss._wire", "remoteloss.v1", "remoteloss.v1.loss_pb2", "remoteloss.v1.loss_pb2_grpc"}


def modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its own name)."""
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = [package, *path.relative_to(directory).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The project's modules that ``name`` imports, wherever the statement is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package that holds this module
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from package import module` imports the module; `from module import name`, the module.
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}"
                elif base in known:
                    yield base


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports(name, path, known)) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_project() -> None:
    edges = graph()
    assert {"remoteloss._client", "remoteloss_server.app", "remoteloss_server.losses.spec"} <= set(edges)
    assert "remoteloss._transport" in edges["remoteloss._client"]
    assert "remoteloss_server.workers" in edges["remoteloss_server.app"]
    assert "remoteloss_bench.load" in edges["remoteloss_bench.command"]


def test_the_sdk_imports_nothing_of_the_other_distribution() -> None:
    """`remoteloss` installs without `remoteloss-server`: no statement of the SDK names the server or
    the load generator (the `bench` command reaches the SDK's command line by an entry point)."""
    edges = graph()
    outside = {name: {t for t in targets if t.split(".")[0] != "remoteloss"} for name, targets in edges.items()
               if name == "remoteloss" or name.startswith("remoteloss.")}
    assert not {name: targets for name, targets in outside.items() if targets}


def test_the_server_imports_only_the_shared_parts_of_the_sdk() -> None:
    edges = graph()
    sdk = {name: {t for t in targets if t == "remoteloss" or t.startswith("remoteloss.")}
           for name, targets in edges.items() if name.startswith("remoteloss_server")}
    assert not {name: targets - SHARED for name, targets in sdk.items() if targets - SHARED}


def test_a_cycle_is_found_wherever_its_imports_are() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import cycles (TYPE_CHECKING and function-level imports count):\n" + "\n".join(
        " <-> ".join(component) for component in found
    )
