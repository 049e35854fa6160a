"""docs/architecture.md's module map is the code's: regenerated from the imports, it must not change."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from tests.support import ROOT, load_script


def test_the_module_map_in_the_docs_is_current() -> None:
    check = [sys.executable, "tools/import_graph.py", "--check", "docs/architecture.md"]
    done = subprocess.run(check, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_map_draws_every_module_and_import(tmp_path) -> None:
    """A module the code has, and an import between two, are in the chart (so a stale chart is caught)."""
    chart = subprocess.run(
        [sys.executable, "tools/import_graph.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "trainer_train_loop[train_loop]" in chart
    assert "trainer_train_loop --> trainer_sampling" in chart  # the loop imports the sampler at module level
    assert "operator_progress --> api_tags" in chart
    assert "torch" not in chart  # only xling's own modules


def test_the_map_follows_imports_through_packages() -> None:
    """An import through a package is drawn to the module that defines the name: the evaluation the training
    loop runs, the bad-row error the driver catches (re-exported by ``data/__init__``), and the subcommands
    the CLI registers. The map lacked all three while ``evaluation/__init__`` was a lazy name table and the CLI
    was assembled from module-name strings."""
    chart = subprocess.run(
        [sys.executable, "tools/import_graph.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "trainer_train_loop -.-> trainer_evaluation_api" in chart
    assert "trainer_sweep_full_pool -.-> trainer_evaluation_report" in chart
    assert "trainer_driver --> trainer_data_pairs" in chart  # from xling.trainer.data import BadRowError
    assert "trainer_cli -.-> trainer_evaluation_cli" in chart


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a closed path (its first module repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if (found := visit(target)) is not None:
                return found
        path.pop()
        done.add(name)
        return None

    return next((c for name in sorted(graph) if (c := visit(name)) is not None), None)


def test_no_import_cycle_among_xling_modules() -> None:
    """Deferred imports count too: a cycle that only laziness keeps from failing still means neither module
    can be read, tested or moved without the other."""
    import_graph = load_script("tools", "import_graph")
    graph: dict[str, set[str]] = {}
    for src, dst in import_graph.edges(import_graph.modules()):
        graph.setdefault(src, set()).add(dst)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """A two-module cycle behind an acyclic start, and none in a diamond."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert _cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}}) is None


def test_the_contract_package_imports_neither_side() -> None:
    """``xling.api`` is what the trainer and the operator share: it imports neither of them, deferred imports
    included, so the operator cannot reach the trainer through it."""
    import_graph = load_script("tools", "import_graph")
    up = sorted(
        (src, dst)
        for src, dst in import_graph.edges(import_graph.modules())
        if src.startswith("xling.api.") and not dst.startswith("xling.api.")
    )
    assert not up, up
    operator_to_trainer = sorted(
        (src, dst)
        for src, dst in import_graph.edges(import_graph.modules())
        if src.startswith("xling.operator.") and dst.startswith("xling.trainer.")
    )
    assert not operator_to_trainer, operator_to_trainer


def test_the_contract_package_stays_light() -> None:
    """Every module of ``xling.api`` imports without torch, Ray, DeepSpeed, MLflow or the Kubernetes client: the
    operator image has none of them, and ``xling render`` runs in both images."""
    modules = sorted(
        ".".join(("xling", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for path in (ROOT / "api").rglob("*.py")
    )
    banned = ["torch", "ray", "deepspeed", "transformers", "mlflow", "kopf", "kubernetes", "numpy"]
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in {banned!r} if m in sys.modules]\nassert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_xling_environment_variable_is_named_in_the_registry() -> None:
    """``xling.api.env`` is the one list of ``XLING_*`` variables: no other module of the trainer or the
    operator spells one as a string of its own, and each registered name is documented there."""
    from xling.api.env import VARIABLES

    spelled = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}"
        for folder in ("api", "trainer", "operator")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "api" / "env.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"XLING_\w+", node.value)
    ]
    assert not spelled, spelled
    assert all(name.startswith("XLING_") and doc.strip() for name, doc in VARIABLES.items())
    deployed = {
        name
        for folder in ("helm", "manifests", "docker")
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
        for name in re.findall(r"XLING_[A-Z_]+", path.read_text(errors="replace"))
    }
    assert deployed <= set(VARIABLES), sorted(deployed - set(VARIABLES))  # the chart sets only known names


# The layers of docs/architecture.md, bottom first. A module may import (deferred imports included) from its
# own layer or a lower one, never from a higher one. A module's layer is that of its exact name, else of the
# longest package pattern it falls under; a module no pattern covers fails the test (give it a layer).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("contracts", ("xling.api.*",)),
    (
        "library",
        (
            "xling.trainer.*",
            "xling.trainer.data.*",
            "xling.trainer.evaluation.*",
            "xling.trainer.capacity.*",
            "xling.operator.*",
        ),
    ),
    ("the worker", ("xling.trainer.train_loop",)),
    ("reports", ("xling.trainer.sweep.*",)),
    ("what the drivers share", ("xling.trainer.driver",)),
    (
        "drivers",
        (
            "xling.trainer.run",
            "xling.trainer.sweep.tune",
            "xling.trainer.sweep.full_pool",
            "xling.operator.reconcile",
            "xling.operator.render",
        ),
    ),
    (
        "entry points",
        (
            "xling.trainer.cli",
            "xling.trainer.evaluation.cli",
            "xling.trainer.sweep.cli",
            "xling.trainer.capacity.cli",
            "xling.operator.handlers",
        ),
    ),
)


def _layer(module: str) -> int:
    """The index in LAYERS of ``module``'s layer."""
    exact = [i for i, (_, names) in enumerate(LAYERS) if module in names]
    if exact:
        return exact[0]
    covering = [(len(p), i) for i, (_, names) in enumerate(LAYERS) for p in names
                if p.endswith(".*") and module.startswith(p[:-1])]  # fmt: skip
    assert covering, f"{module} has no layer: add it to LAYERS in tests/test_architecture.py"
    return max(covering)[1]


def test_no_import_points_up_a_layer() -> None:
    """The reader walks down: an entry point calls a driver, a driver the shared sequence, which starts the
    worker over the library and the contracts. An arrow up (a report importing a driver, the library a
    report) would make a lower module unreadable without a higher one."""
    import_graph = load_script("tools", "import_graph")
    up = sorted(
        f"{src} ({LAYERS[_layer(src)][0]}) -> {dst} ({LAYERS[_layer(dst)][0]})"
        for src, dst in import_graph.edges(import_graph.modules())
        if _layer(dst) > _layer(src)
    )
    assert not up, "imports pointing up a layer:\n" + "\n".join(up)


def test_the_layer_check_finds_an_arrow_up() -> None:
    assert _layer("xling.trainer.sweep.summary") > _layer("xling.trainer.stats")
    assert _layer("xling.trainer.driver") > _layer("xling.trainer.train_loop") > _layer("xling.trainer.model")
    assert _layer("xling.trainer.evaluation.cli") > _layer("xling.trainer.evaluation.api")
    assert (
        _layer("xling.operator.handlers") > _layer("xling.operator.reconcile") > _layer("xling.operator.kube")
    )


def test_no_module_of_the_trainer_or_the_operator_is_over_500_lines() -> None:
    """A module a newcomer reads in one sitting (issue 25)."""
    long = {
        str(path.relative_to(ROOT)): n
        for folder in ("trainer", "operator")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, long
