"""The package's structure: subpackages along the data flow, and the import rules between them.

``study/`` holds the foundation at its root (errors, file utilities, the on-disk format, fault
hooks, provenance, the compatibility module) and one subpackage per step of the data flow. Each may
import only what lies upstream of it:

=============  ====================================================
package        may import (besides itself and the root)
=============  ====================================================
``config``     nothing else: torch-free, Ray-free
``data``       ``config``
``training``   ``config``, ``data``
``results``    ``config`` (no torch, no Ray: tables and reports work anywhere)
``search``     ``config``, ``data``, ``training``, ``results``
=============  ====================================================

The command line (``study.cli``, ``study.__main__``) and the test helpers (``study.testing``) may
import anything. The package's own ``__init__`` (``import study``: the plug-in doors
``study.register_*``) may import ``config``, which keeps ``import study`` torch-free. The rules hold
for every import, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

STUDY_PKG = Path(__file__).resolve().parents[1] / "study"

ALLOWED = {
    "root": {"root"},
    "config": {"root", "config"},
    "data": {"root", "config", "data"},
    "training": {"root", "config", "data", "training"},
    "results": {"root", "config", "results"},
    "search": {"root", "config", "data", "training", "results", "search"},
}
ANYTHING = {"cli", "__main__", "testing"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(STUDY_PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(module: str) -> str:
    """``root`` for ``study`` and ``study.<module>``; else the subpackage (``study.data.x`` -> ``data``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    sub = STUDY_PKG / parts[1]
    if sub.is_dir() or parts[1] in ANYTHING:
        return parts[1]
    return "root"


def _imports(path: Path) -> set[str]:
    """The modules of ``study`` that ``path`` imports anywhere (module level and inside functions)."""
    here = _module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "study" or mod.startswith("study."):
                out.add(mod)
                out.update(
                    f"{mod}.{a.name}"
                    for a in node.names
                    if (STUDY_PKG.parent / f"{mod}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                )
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "study" or a.name.startswith("study."))
    return out


def _graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in STUDY_PKG.rglob("*.py")}
    return {m: {d for d in _imports(p) if d in mods and d != m} for m, p in mods.items()}


def test_the_pipeline_is_visible_in_the_package():
    subpackages = sorted(p.name for p in STUDY_PKG.iterdir() if (p / "__init__.py").is_file())
    assert {"config", "data", "training", "search", "results"} <= set(subpackages)


def test_each_package_imports_only_what_lies_upstream():
    graph = _graph()
    assert "study.search.driver" in graph and graph["study.search.driver"]  # the graph is really read
    broken = []
    for mod, deps in sorted(graph.items()):
        pkg = _package(mod)
        if pkg in ANYTHING:
            continue
        allowed = ALLOWED[pkg] | ({"config"} if mod == "study" else set())
        for dep in sorted(deps):
            if _package(dep) not in allowed:
                broken.append(f"{mod} imports {dep}")
    assert not broken, "import rules broken:\n" + "\n".join(broken)


def test_no_import_cycle_among_the_modules_of_study():
    graph = _graph()
    # the package __init__ files are left out: importing a submodule imports its package first, which
    # is no dependency of the submodule's own code
    graph = {
        m: {d for d in deps if not (STUDY_PKG.parent / d.replace(".", "/") / "__init__.py").exists()}
        for m, deps in graph.items()
    }

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in path:
                    stack.append((dep, path + [dep]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, f"import cycles: {cycles}"
