"""The package layout is the pipeline: modules import only stages before them, with no cycles, also through
imports made inside functions (which would otherwise hide a cycle)."""

import ast
from pathlib import Path

import attngen

PACKAGE = Path(attngen.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """attngen module -> the attngen modules it imports anywhere in its body (the package root excluded)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m not in ("attngen", name)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cache_and_the_dsl_stay_at_the_bottom():
    graph = imports()
    assert graph["attngen.cache"] <= {"attngen._resources", "attngen.errors"}
    # the predicate language and its affine atoms, the LSH hash, the block and token top-k scores, the score
    # modifications (top-k by token ranks the modified scores) and the constructors' behaviour under torch.compile
    # sit under the DSL; plot (matplotlib) is loaded only to draw
    under = {
        "attngen.errors",
        "attngen.plot",
        "attngen.affine",
        "attngen.expr",
        "attngen.hashing",
        "attngen.tracing",
    }
    assert graph["attngen.pattern"] <= under | {"attngen.blocktopk", "attngen.tokentopk", "attngen.scoremod"}
    assert graph["attngen.scoremod"] <= {"attngen.errors"}
    assert graph["attngen.affine"] <= {"attngen.expr"}
    assert graph["attngen.expr"] <= {"attngen.errors"}
    assert graph["attngen.hashing"] <= {"attngen.errors"}
    assert graph["attngen.blocktopk"] == set()
    assert graph["attngen.tokentopk"] <= {"attngen.errors"}
    assert graph["attngen.plot"] <= {"attngen.errors"}
    assert graph["attngen.tracing"] <= {"attngen.errors"}
    assert "attngen.schedule" not in graph["attngen.plan"]  # the plan is length-independent


def test_a_cycle_would_be_found():
    """The walker sees imports made inside functions, and the search finds a cycle through them."""
    graph = imports()
    assert "attngen.cache" in graph["attngen.nvrtc"]  # nvrtc.py's cache import
    assert "attngen.pattern" in graph["attngen.cli"]  # made inside a function of cli.py
    graph["attngen.errors"] = {"attngen.nvrtc"}  # what a lazy `from attngen.nvrtc import ...` would add
    assert find_cycle(graph) is not None
