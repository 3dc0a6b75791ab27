"""The shape of the code: no import cycles, `networks/` independent of `library/`, small functions and files
(in `networks/`, `library/` and the root scripts).

Imports are read with `ast` (never executed), lazy imports inside functions included: a cycle through a
function-level import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("networks", "library")

# Cycles known when this test was written, each to be removed by its own change. A listed cycle that is
# gone makes the test fail too, so the list only shrinks.
KNOWN_CYCLES: set[frozenset[str]] = set()
# Entry scripts that live under networks/ for their user-facing (sd-scripts) paths and may import library/
# like the scripts at the root do: the converter builds Anima's module tree to learn its names, the file
# tools read model files and share their code in library/tools/.
NETWORKS_SCRIPTS = {
    "networks.convert_anima_lora_to_comfy",
    "networks.inspect_network",
    "networks.resize_lora",
    "networks.sdxl_merge_lora",
    "networks.anima_merge_lora",
}

MAX_FUNCTION_LINES = 120
MAX_FILE_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[_module_name(path)] = path
    return mods


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """Project modules named by one import statement (a `from x import y` names x.y when that is a module)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
    out = []
    for n in names:
        while (
            n and n not in known
        ):  # `import a.b.c` of a non-module attribute path: its longest module prefix
            n = n.rpartition(".")[0]
        if n:
            out.append(n)
    return out


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for target in _imported(node, mod, is_package, known):
                if target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_lazy_and_relative_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    known = {"p": ROOT, "p.x": ROOT, "p.y": ROOT}
    lazy = ast.parse("def f():\n    from .y import thing\n")
    hits = [t for node in ast.walk(lazy) for t in _imported(node, "p.x", False, known)]
    assert hits == ["p.y"]


def test_no_import_cycles_in_networks_and_library() -> None:
    found = set(cycles(import_graph()))
    new = sorted(sorted(c) for c in found - KNOWN_CYCLES)
    assert not new, f"import cycles: {new}"
    fixed = sorted(sorted(c) for c in KNOWN_CYCLES - found)
    assert not fixed, f"these known cycles are gone: remove them from KNOWN_CYCLES: {fixed}"


def test_networks_imports_nothing_from_library() -> None:
    graph = import_graph()
    bad = sorted(
        (m, t)
        for m, targets in graph.items()
        if m.split(".")[0] == "networks" and m not in NETWORKS_SCRIPTS
        for t in targets
        if t.split(".")[0] == "library"
    )
    assert not bad, f"networks/ importing library/: {bad}"


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def size_checked_files() -> list[Path]:
    """`networks/`, `library/` and the entry scripts at the root (tests/ and bench/ are not held to it)."""
    files = [path for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))]
    return files + sorted(ROOT.glob("*.py"))


def test_size_rule_covers_library_and_root_scripts() -> None:
    names = {str(p.relative_to(ROOT)) for p in size_checked_files()}
    assert {"networks/lokr.py", "library/training/run.py", "gen_img.py", "sdxl_train_network.py"} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_functions_and_files_are_small() -> None:
    too_long: list[str] = []
    for path in size_checked_files():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
        too_long += _long_functions(path)
    assert not too_long, too_long


# Citations of specification files that live outside the repository: the reasoning belongs in the comment
# itself or in docs/, where a reader of the repository can follow it.
OUTSIDE_CITATION = re.compile(r"§|\bspec/|\[Q\]|(?<!docs/)\b(?:sdxl|anima|networks)\.md\b")


def test_outside_citation_pattern() -> None:
    for cited in ("(spec §2)", "spec/sdxl.md section 3", "sdxl.md §5", "([Q] in the spec)"):
        assert OUTSIDE_CITATION.search(cited), cited
    for ours in ("see docs/dataset_config.md, Buckets", "docs/anima.md"):
        assert not OUTSIDE_CITATION.search(ours), ours


def test_no_comment_cites_files_outside_the_repository() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in size_checked_files()
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE_CITATION.search(line)
    ]
    assert not hits, hits
