"""The layering of docs/architecture.md, held by reading the source (an AST walk, no imports):
who may import whom, no cycles, and modules small enough to read top to bottom."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffcli"

LEAVES = {"diffcli.errors", "diffcli.files", "diffcli.images", "diffcli.shapes"}  # import nothing of diffcli
NETWORKS = {"diffcli.unet", "diffcli.classifier", "diffcli.inception", "diffcli.generate", "diffcli.trainstate",
            "diffcli.training", "diffcli.fitting", "diffcli.distill", "diffcli.checkpoint"}  # what builds or holds a network
MAX_LINES = {"default": 300, "diffcli.fitting": 400, "cli": 200}  # fitting: the one loop every run shares


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every diffcli module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A path that comes back to its start, or None (a depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def without_package_inits(edges):
    """`from diffcli import x` names the package `diffcli` as well; its __init__ holds only the version."""
    return {k: {v for v in vs if v != "diffcli"} for k, vs in edges.items()}


def test_the_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_there_is_no_import_cycle():
    edges = without_package_inits(graph(modules()))
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_nothing_outside_the_cli_imports_it():
    for name, deps in graph(modules()).items():
        if not (name.startswith("diffcli.cli") or name == "diffcli.__main__"):
            assert not {d for d in deps if d.startswith("diffcli.cli")}, f"{name} imports the command layer"


@pytest.mark.parametrize("module,forbidden", [
    ("diffcli.samplers", NETWORKS),  # pure functions of a denoiser callable
    ("diffcli.guidance", NETWORKS),
    ("diffcli.schedules", {m for m in modules() if m != "diffcli.schedules"}),  # knows no network, nor anything else
    ("diffcli.spec", NETWORKS | {"diffcli.samplers", "diffcli.schedules"}),  # torch-free: --help shows its defaults
    ("diffcli.config", NETWORKS | {"diffcli.checkpoint", "diffcli.data"}),
    ("diffcli.metrics", NETWORKS),
])
def test_layering(module, forbidden):
    deps = graph(modules())[module]
    assert not deps & forbidden, f"{module} imports {sorted(deps & forbidden)}"


def test_leaf_modules_import_nothing_of_diffcli():
    edges = graph(modules())
    for leaf in LEAVES:
        assert not edges[leaf], f"{leaf} is a leaf but imports {sorted(edges[leaf])}"


def test_the_command_layer_imports_no_torch_at_module_level():
    for name, path in modules().items():
        if name.startswith("diffcli.cli"):
            top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {
                n.module for n in top if isinstance(n, ast.ImportFrom)}
            assert not {n for n in names if n and n.split(".")[0] == "torch"}, f"{name} imports torch at start-up"


def test_modules_stay_small():
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        limit = MAX_LINES.get(name, MAX_LINES["cli"] if name.startswith("diffcli.cli") else MAX_LINES["default"])
        assert lines <= limit, f"{path.relative_to(SRC.parent)} has {lines} lines (at most about {limit})"


def test_the_walk_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from diffcli.cli import app\n")
    assert imports_of(f, {"diffcli.cli", "diffcli.unet"}) == {"diffcli.cli"}
