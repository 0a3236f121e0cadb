"""The package's structure holds: layers without upward imports or circles, modules a reader can hold in mind, no
module-level state that a function changes."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "chattune"
LAYERS = ("data", "train", "export")  # each may import the ones before it, never the ones after
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("chattune", *path.relative_to(PACKAGE).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The chattune modules a file imports at run time (anywhere in it; annotations-only imports excluded)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chattune"):
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("chattune")}
    return {m for m in found if m in known and m != "chattune"}


def test_no_import_circles():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                circles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other, [*stack, other])
        state[name] = 2

    for name in known:
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_layers_import_only_downwards():
    known = modules()
    upward = []
    for name, path in known.items():
        layer = name.split(".")[1] if name.count(".") >= 2 else None
        if layer not in LAYERS:
            continue
        later = LAYERS[LAYERS.index(layer) + 1:]
        upward += [f"{name} -> {m}" for m in imports(path, known) if m.split(".")[1] in later]
    assert upward == []


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_function_changes_module_state():
    """Workers get what they need passed in; nothing rebinds a module global."""
    offenders = [f"{path.name}:{node.lineno}" for path in modules().values()
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Global)]
    assert offenders == []
