"""The module map of docs/architecture.md, generated from the code's own imports.

Reads every module of ``xling.api``, ``xling.trainer`` and ``xling.operator`` with :mod:`ast` (nothing is
imported or run) and writes two Mermaid flowcharts: the packages, with the number of module imports between
them, and every module grouped by package, one arrow per import of another xling module. An import at module
level is a solid arrow; one inside a function (deferred so that a light command does not pull torch or ray) is
dotted. ``--check FILE`` fails when the chart in FILE is stale.

    python tools/import_graph.py                          # print the chart
    python tools/import_graph.py --write docs/architecture.md
    python tools/import_graph.py --check docs/architecture.md
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Import name -> folder, as pyproject.toml maps them.
PACKAGES = {"xling.api": ROOT / "api", "xling.trainer": ROOT / "trainer", "xling.operator": ROOT / "operator"}
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"


def modules() -> dict[str, Path]:
    """Every module's dotted name and file (``__init__`` and ``__main__`` files are left out of the map)."""
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if path.stem in ("__init__", "__main__"):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((prefix, *parts))] = path
    return found


def _package(name: str) -> str:
    return name.rsplit(".", 1)[0]


#: A package's names -> the modules they stand for: ``pkg.name`` -> {module}, and ``pkg`` -> every module its
#: ``__init__`` imports (what importing the package runs).
Exports = dict[str, set[str]]


def package_exports(known: set[str]) -> Exports:
    """What each package ``__init__`` makes importable, so that an import through the package is drawn as an
    arrow to the module that defines the name (``from xling.trainer.data import BadRowError`` ->
    ``data.pairs``); a name the ``__init__`` defines itself stands for every module the ``__init__`` imports."""
    inits = {
        ".".join((prefix, *path.parent.relative_to(folder).parts)): path
        for prefix, folder in PACKAGES.items()
        for path in sorted(folder.rglob("__init__.py"))
    }
    out: Exports = {}
    for package, path in inits.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in known else node.module
                    if target in known:
                        out[f"{package}.{alias.asname or alias.name}"] = {target}
                        imported.add(target)
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                out[f"{package}.{node.name}"] = imported  # filled in as the loop goes on: the same set
        out[package] = imported
    return out


def _targets(node: ast.Import | ast.ImportFrom, known: set[str], exports: Exports) -> set[str]:
    """The xling modules one import statement names: ``from pkg import mod`` counts as ``pkg.mod``, and a
    name or package that a package ``__init__`` provides as the modules it stands for (:func:`package_exports`).

    The code base uses absolute imports only (ruff's isort keeps them so)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        module = node.module or ""
        names = [f"{module}.{alias.name}" for alias in node.names]
        if module in known or not any(n in known or n in exports for n in names):
            names.append(module)
    found = {n for n in names if n in known}
    for n in names:
        if n not in known:
            found |= exports.get(n, set())
    return found


def edges(found: dict[str, Path]) -> dict[tuple[str, str], bool]:
    """(importer, imported) -> True when some import of it is at module level."""
    known = set(found)
    exports = package_exports(known)
    out: dict[tuple[str, str], bool] = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in tree.body}
        typing_only = {
            id(sub)
            for n in tree.body
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for sub in ast.walk(n)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in typing_only:
                continue
            for target in _targets(node, known, exports) - {name}:
                out[(name, target)] = out.get((name, target), False) or id(node) in top
    return out


def _id(name: str) -> str:
    return name.removeprefix("xling.").replace(".", "_")


def chart() -> str:
    """Two charts: packages with how many imports join them, then every module."""
    found = modules()
    graph = edges(found)
    between: dict[tuple[str, str], int] = {}
    for src, dst in graph:
        if _package(src) != _package(dst):
            between[(_package(src), _package(dst))] = between.get((_package(src), _package(dst)), 0) + 1
    lines = ["```mermaid", "flowchart LR"]
    lines += [f"  {_id(p)}_pkg[{p}]" for p in sorted({_package(n) for n in found})]
    lines += [f"  {_id(s)}_pkg -->|{n}| {_id(d)}_pkg" for (s, d), n in sorted(between.items())]
    lines += ["```", "", "```mermaid", "flowchart LR"]
    for package in sorted({_package(n) for n in found}):
        lines.append(f"  subgraph {_id(package)}_pkg [{package}]")
        lines += [f"    {_id(n)}[{n.rsplit('.', 1)[1]}]" for n in sorted(found) if _package(n) == package]
        lines.append("  end")
    for (src, dst), eager in sorted(graph.items()):
        lines.append(f"  {_id(src)} {'-->' if eager else '-.->'} {_id(dst)}")
    lines.append("```")
    return "\n".join(lines)


def _spliced(doc: str, block: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"the document has no {BEGIN} … {END} markers")
    head, rest = doc.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="replace the chart between the markers of this file")
    group.add_argument("--check", type=Path, help="exit 1 when the chart in this file is not the code's")
    args = parser.parse_args(argv)
    block = chart()
    if args.write:
        args.write.write_text(_spliced(args.write.read_text(), block))
    elif args.check:
        doc = args.check.read_text()
        if _spliced(doc, block) != doc:
            print(
                f"{args.check}: the module chart is stale; run python tools/import_graph.py --write {args.check}"
            )
            return 1
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
