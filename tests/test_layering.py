"""The inference package's structure: imports run one way (no cycles; the decode state never imports the
network), and only public torch ops are used."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "reformer_infer"


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source (type-checking blocks and
    function bodies included: a cycle there is a cycle all the same)."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for path in PKG.glob("*.py"):
        me = path.stem
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 1 or mod.startswith("reformer_infer"):
                    base = mod.removeprefix("reformer_infer").lstrip(".") if node.level == 0 else mod
                    if base:
                        names.append(base.split(".")[0])
                    else:  # from . import x
                        names += [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names += [a.name.split(".")[1] for a in node.names if a.name.startswith("reformer_infer.")]
            graph[me].update(n for n in names if n in mods and n != me)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert graph["model"] >= {"pool", "cache"}  # the walk sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_decode_state_does_not_import_the_network():
    graph = import_graph()
    for mod in ("pool", "cache"):
        assert "model" not in graph[mod] and "export" not in graph[mod], graph[mod]


def test_no_private_aten_op_is_named():
    private = re.compile(r"torch\.ops\.aten\._|aten\._[a-z]")
    hits = [f"{p.name}:{i}" for p in PKG.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if private.search(line)]
    assert not hits, hits
