"""The package's shape: no import cycle between seqgen's modules, and no module grows past ~500 lines without
saying why at its top.

The import graph is read from the source (every `import` statement, at module level or inside a function; the
ones under `if TYPE_CHECKING:` are for annotations only and never run), so a cycle hidden in a function-local
import counts as much as one at the top.
"""
import ast
import os
from pathlib import Path

import seqgen

ROOT = Path(seqgen.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str):
    """Every module name an import statement of `tree` names (absolute; relative ones resolved against
    `package`), skipping `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (name for child in node.orelse for name in _imports(child, package))
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)   # `from seqgen.x import module`
        yield from _imports(node, package)


def import_graph() -> dict[str, set[str]]:
    """seqgen module -> the seqgen modules it imports (importing a package's submodule is not an edge to the
    package's own __init__ unless the package itself is named)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {m for m in _imports(tree, package) if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_sees_function_local_imports_and_skips_type_checking_ones():
    tree = ast.parse("import seqgen.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import seqgen.b\n"
                     "def f():\n    from seqgen.c import d\n")
    assert set(_imports(tree, "seqgen")) >= {"seqgen.a", "seqgen.c", "seqgen.c.d"}
    assert "seqgen.b" not in set(_imports(tree, "seqgen"))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "seqgen.model" in graph and "seqgen.train" in graph["seqgen.tasks.translation"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# docs/design.md, "Import layers": a module may import from its own line or the lines above it.
LAYERS = [
    "errors atomic log outputs tensors allocator threads precision distributed vocab tokenizers checkpoint ema metrics",
    "encoders data decoders config flops plots zoo",
    "generation",
    "inference",
    "model",
    "train runs average objectives",
    "tasks bench serve cards",
    "cli",
]


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "seqgen"
    if name == "seqgen":                      # the package itself: its lazy exports reach model.py
        return LAYERS.index("model")
    return next(i for i, line in enumerate(LAYERS) if name in line.split())


def test_imports_follow_the_documented_layers():
    upward = [(a, b) for a, targets in import_graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "imports from a lower layer of docs/design.md into a higher one: " + ", ".join(
        f"{a} -> {b}" for a, b in sorted(upward))


def test_model_does_not_depend_on_training():
    """Seq2Seq.translate / .caption call seqgen.inference, which never reaches the trainer or the tasks."""
    graph = import_graph()
    seen, todo = set(), ["seqgen.model"]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert not {m for m in seen if m == "seqgen.train" or m.startswith("seqgen.tasks")}, sorted(seen)


def test_long_modules_say_why():
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert f"over {MAX_LINES} lines" in doc, (f"{os.path.relpath(path)} has {text.count(chr(10))} lines: "
                                                      f"split it, or say in its docstring why it is over "
                                                      f"{MAX_LINES} lines")
