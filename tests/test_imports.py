"""The package's imports run one way: command line -> workflows -> checkpoint/data/runtime -> model
-> sampling -> flow/priors -> fused -> layers/reader -> pixels/pretrained/checkpoint schema/config/errors.
Read from the source (ast), so a cycle hidden by an import inside a function shows too."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "glowflow"

# Rank of each top-level part: a module may import only parts of a lower rank (or, inside a
# sub-package, its own modules, without cycles).
RANKS = {
    "errors": 0,
    "names": 0,
    "files": 1,
    "invertible": 1,
    "config": 1,
    "preflight": 1,
    "flags": 2,
    "outputs": 1,
    "progress": 1,
    "runfolder": 2,
    "cost": 2,
    "curves": 2,
    "pixels": 2,
    "pretrained": 2,
    "checkpoint_schema": 2,
    "training_state": 2,
    "latent_fit": 2,
    "layers": 3,
    "reader": 3,
    "fused": 4,
    "flow": 5,
    "priors": 5,
    "sampling": 6,
    "model": 7,
    "checkpoint": 8,
    "data": 8,
    "runtime": 8,
    "tracking": 8,
    "training": 9,
    "train": 10,  # the old home of training: an alias of glowflow.training for users
    "export": 9,
    "sample": 9,
    "ood": 9,
    "cli": 11,
    "__main__": 12,
    "__init__": 12,
}
LAZY_IMPORTS_ALLOWED = {"glowflow.cli"}  # the command-line dispatch imports a command when it runs


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path):
    """(imported glowflow module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # ``from pkg import submodule`` depends on the submodule; ``from mod import name`` on mod
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            targets = submodules if len(submodules) == len(node.names) else [base] + submodules
        for target in targets:
            if target == "glowflow" or target.startswith("glowflow."):
                yield target, id(node) in top_level


def _resolve(target: str) -> str:
    """The module a dotted import name refers to (``glowflow.data.load_dataset`` -> ``glowflow.data``)."""
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


def _graph():
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target, at_top in _imports(path):
            module = _resolve(target)
            if module != name and module != "glowflow":
                edges.add((module, at_top))
        graph[name] = edges
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_rank():
    assert {_part(m) for m in MODULES} <= set(RANKS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
    rank = RANKS[_part(name)]
    for module, at_top in _graph()[name]:
        if not at_top:
            assert name in LAZY_IMPORTS_ALLOWED, f"{name} imports {module} inside a function"
        if _part(module) == _part(name):
            continue  # inside a sub-package: checked for cycles below
        assert RANKS[_part(module)] < rank, f"{name} (rank {rank}) imports {module} (rank {RANKS[_part(module)]})"


def test_no_import_cycle():
    graph = {name: {m for m, _ in edges} for name, edges in _graph().items()}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
