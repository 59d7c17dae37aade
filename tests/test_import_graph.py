"""The package's module-level imports form no cycle (issue 14: config <-> optim was one)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scaletrain"


def module_imports() -> dict[str, set[str]]:
    """scaletrain module -> the scaletrain modules it imports at module level."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.parse(path.read_text()).body:  # module level only: function-local imports are deferred
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scaletrain"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("scaletrain"))
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = module_imports()
    assert len(graph) > 50 and "scaletrain.optim.config" in graph["scaletrain.optim"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
