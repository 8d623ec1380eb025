"""The layers run one way (README, "Code layout"), checked on the import graph of the source.

    embedpipe/   orchestration: CLI, stages, runs, publishing             (imports everything below)
    pipeline/    the Beam job          trainer/   training and export     (side by side)
    schemas/     config, run layout, manifest, feature and table specs    (imports nothing above)

`violations` reads every import statement (module level or inside a function) of the four
packages; the planted graphs below show that each rule catches the edge it forbids.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("schemas", "pipeline", "trainer", "embedpipe")
LAYOUT = "schemas.layout"
# The one project module the run layout may import: the errors, which import nothing at all (so the
# CLI knows them without TensorFlow; it imports a command's module with importlib once its flags
# parsed).
ERRORS = "schemas.errors"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph(root: str = ROOT) -> dict[str, list[tuple[str, bool]]]:
    """{module: [(imported module, inside a function?), ...]} for every module of PACKAGES."""
    modules = {}
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(root, package)):
            modules.update(
                {_module_name(os.path.join(folder, n)): os.path.join(folder, n) for n in names if n.endswith(".py")}
            )
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from schemas import layout` imports the module schemas.layout
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            else:
                continue
            edges += [(t, id(node) in in_function) for t in targets]
        graph[name] = edges
    return graph


def _package(module: str) -> str:
    return module.split(".")[0]


def violations(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    """Every broken rule of the layering, one line each (empty: the layers hold)."""
    project = set(graph)
    found = []
    forbidden = {
        "schemas": ("pipeline", "trainer", "embedpipe", "apache_beam", "keras"),
        "pipeline": ("trainer", "embedpipe", "keras"),
        "trainer": ("pipeline", "embedpipe", "apache_beam"),
    }
    for module, edges in graph.items():
        for target, inside_function in edges:
            top = _package(target)
            if top in forbidden.get(_package(module), ()):
                found.append(f"{module} imports {target}: {_package(module)}/ must not import {top}")
            if module == LAYOUT and top in PACKAGES and target != ERRORS:
                found.append(f"{module} imports {target}: the run layout imports nothing of the project")
            if module == ERRORS:
                found.append(f"{module} imports {target}: the errors module imports nothing")
            if inside_function and top in PACKAGES:
                found.append(f"{module} imports {target} inside a function: imports go at the top of the module")
    # cycles among project modules (depth-first search over project edges)
    edges = {m: sorted({t for t, _ in e if t in project and t != m}) for m, e in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                found.append("import cycle: " + " -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_the_source_tree_keeps_its_layers():
    graph = import_graph()
    assert {"schemas.layout", "pipeline.preprocess", "trainer.train", "embedpipe.cli"} <= set(graph)
    found = violations(graph)
    assert not found, "the layers are broken:\n" + "\n".join(found)


def _planted(**extra) -> dict:
    """A tiny graph that keeps the rules, plus `extra` edges {module: [(target, in function)]}."""
    graph = {
        "schemas.layout": [("tensorflow", False)],
        "schemas.config": [],
        "pipeline.preprocess": [("apache_beam", False), ("schemas.layout", False)],
        "trainer.train": [("keras", False), ("schemas.config", False)],
        "embedpipe.stages": [("pipeline.preprocess", False), ("trainer.train", False)],
        "embedpipe.cli": [("schemas.errors", False)],
        "schemas.errors": [],
    }
    for module, edges in extra.items():
        graph.setdefault(module.replace("__", "."), []).extend(edges)
    return graph


@pytest.mark.parametrize(
    "module, edge, problem",
    [
        ("trainer.train", ("apache_beam", False), "trainer/ must not import apache_beam"),
        ("trainer.train", ("pipeline.preprocess", False), "trainer/ must not import pipeline"),
        ("pipeline.preprocess", ("trainer.train", False), "pipeline/ must not import trainer"),
        ("pipeline.preprocess", ("embedpipe.stages", False), "pipeline/ must not import embedpipe"),
        ("schemas.config", ("trainer.train", False), "schemas/ must not import trainer"),
        ("schemas.layout", ("schemas.config", False), "the run layout imports nothing of the project"),
        ("schemas.layout", ("schemas.errors", False), None),  # allowed: the errors import nothing
        ("schemas.errors", ("os", False), "the errors module imports nothing"),
        ("embedpipe.cli", ("embedpipe.stages", True), "inside a function"),
        ("trainer.train", ("schemas.layout", True), "inside a function"),
        ("schemas.config", ("schemas.layout", False), None),  # allowed: a lower module of the same layer
    ],
)
def test_each_forbidden_edge_is_caught(module, edge, problem):
    assert violations(_planted()) == []
    found = violations(_planted(**{module.replace(".", "__"): [edge]}))
    if problem is None:
        assert found == []
    else:  # the edge's own rule first; an edge back up a layer may close a cycle as well
        assert found and problem in found[0] and all(f.startswith("import cycle") for f in found[1:]), found


def test_a_cycle_is_caught():
    graph = _planted(schemas__config=[("schemas.manifest", False)], schemas__manifest=[("schemas.config", False)])
    assert violations(graph) == ["import cycle: schemas.config -> schemas.manifest -> schemas.config"]


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return result.stdout.strip()


def test_training_and_loading_tables_need_no_beam():
    """What the trainer and the README's downstream loader import, Beam and pipeline/ included
    transitively, in a fresh interpreter."""
    loaded = _python(
        "import sys, trainer.tables, trainer.train, trainer.export, trainer.report, trainer.layers; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'apache_beam', 'pipeline', 'embedpipe'}))"
    )
    assert loaded == "[]"


def test_command_help_imports_no_tensorflow():
    out = _python(
        "import contextlib, io, sys\n"
        "from embedpipe import cli\n"
        "for command in ('run', 'preprocess', 'train', 'neighbors', 'report'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main([command, '--help'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'apache_beam', 'keras', 'pyarrow'}))"
    )
    assert out == "[]"
