"""The shape of the package: imports point one way, in the layer order docs/architecture.md
documents, and the light commands stay light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "potstill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> set[str]:
    """potstill modules ``name`` imports, at module level or inside functions (not the ones
    under ``if TYPE_CHECKING:``, which never run)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("potstill")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("potstill"):
                continue
            for alias in node.names:  # `from potstill.methods import registry` names a module
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    found.discard(name)
    return {m for m in found if m in MODULES}


GRAPH = {name: imports_of(name) for name in MODULES}


def documented_layers() -> list[list[str]]:
    """The layer table of docs/architecture.md, bottom first: rows ``| N | `a`, `b` | … |``."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", text, flags=re.M)
    assert rows, "docs/architecture.md has no layer table"
    assert [int(n) for n, _ in rows] == list(range(len(rows))), "layers numbered 0, 1, 2, …"
    return [re.findall(r"`([\w.]+)`", cell) for _, cell in rows]


def layer_of(name: str, layers: list[list[str]]) -> int:
    """The layer of the most specific documented prefix of ``name`` (``potstill.`` dropped)."""
    short = name.removeprefix("potstill.")
    best, where = "", None
    for i, names in enumerate(layers):
        for prefix in names:
            if (short == prefix or short.startswith(prefix + ".")) and len(prefix) > len(best):
                best, where = prefix, i
    if name == "potstill":
        return 0
    assert where is not None, f"{name} is in no layer of docs/architecture.md"
    return where


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_documented_layer_order():
    layers = documented_layers()
    upward = [
        f"{a} (layer {layer_of(a, layers)}) imports {b} (layer {layer_of(b, layers)})"
        for a, targets in sorted(GRAPH.items())
        for b in sorted(targets)
        if layer_of(b, layers) > layer_of(a, layers)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_errors_is_a_leaf_and_methods_import_recipe_for_typing_only():
    assert GRAPH["potstill.errors"] == set()
    methods = [m for m in GRAPH if m.startswith("potstill.methods.")]
    assert methods and all("potstill.recipe" not in GRAPH[m] for m in methods)
    # validating a recipe reads the registry, never a method's implementation
    reach, todo = set(), ["potstill.recipe"]
    while todo:
        for nxt in GRAPH[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    implementations = {m for m in methods if m not in ("potstill.methods.registry",)}
    assert not reach & implementations, sorted(reach & implementations)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


LIGHT = """
import sys
from potstill.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("accelerate", "potstill.train", "potstill.methods.token_level")
               if m in sys.modules)
print("LOADED:", ",".join(sorted(m for m in sys.modules if m.startswith("potstill"))))
print("HEAVY:", ",".join(heavy))
sys.exit(code)
"""


def _light(*argv: str, cwd: Path = ROOT) -> tuple[set[str], set[str]]:
    """(heavy modules, potstill modules) in sys.modules after ``potstill *argv``."""
    out = subprocess.run(
        [sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, heavy = out.stdout.rsplit("LOADED:", 1)[1].split("HEAVY:")
    return set(filter(None, heavy.strip().split(","))), set(loaded.strip().split(","))


def imports_accelerate(name: str) -> bool:
    tree = ast.parse(MODULES[name].read_text())
    return any(
        isinstance(n, ast.Import | ast.ImportFrom)
        and any((getattr(n, "module", None) or a.name).startswith("accelerate") for a in n.names)
        for n in ast.walk(tree)
    )


@pytest.mark.parametrize("argv", [["--help"], ["keys"], ["train", "--help"]])
def test_help_and_keys_load_neither_accelerate_nor_the_loop(argv):
    heavy, _ = _light(*argv)
    assert heavy == set()


def test_check_loads_neither_accelerate_nor_the_loop(tmp_path, tiny_chat_lm):
    model, tokenizer = tiny_chat_lm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n' * 10)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: token_level\nteacher: {{model: {tmp_path / 'model'}}}\n"
        f"student: {{init: prune, keep_layers: [0]}}\ndata: {{train: {tmp_path / 'data.jsonl'}}}\n"
    )
    heavy, loaded = _light("check", str(recipe))
    # transformers itself imports Accelerate when it reads a model config (its activations
    # module reaches transformers.integrations.accelerate); potstill's own part of `check`
    # imports neither Accelerate nor the loop.
    assert "potstill.train" not in heavy and "potstill.methods.token_level" not in heavy
    assert "potstill.models" in loaded
    assert imports_accelerate("potstill.train")  # the probe sees an import when there is one
    assert not [m for m in loaded if m in MODULES and imports_accelerate(m)]
