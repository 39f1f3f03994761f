"""The package's layering (../shared/DESIGN.md): io has no import circle; batch logic is library code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parents[1]
IO = ROOT / "medsr" / "io"


def _io_imports(path: Path) -> set[str]:
    """medsr.io.* modules that ``path`` imports anywhere (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medsr.io."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("medsr.io.")}
    return found


def _graph() -> dict[str, set[str]]:
    return {p.stem: _io_imports(p) - {p.stem} for p in IO.glob("*.py") if p.stem != "__init__"}


def test_io_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert "base" in graph and graph["base"] == set(), "medsr.io.base must import no other io module"
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("io import circle: " + " -> ".join([*stack[stack.index(node):], node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node])
        done.add(node)

    for n in sorted(graph):
        visit(n, [])


def test_format_modules_sit_on_base_not_on_the_dispatch() -> None:
    graph = _graph()
    for mod in ("dicom", "dicom_derive", "probe", "raster"):
        assert "image" not in graph[mod], f"medsr.io.{mod} imports the read/write dispatch (medsr.io.image)"


@pytest.mark.parametrize("module", sorted(p.stem for p in IO.glob("*.py") if p.stem != "__init__"))
def test_each_io_module_imports_alone(module: str) -> None:
    """Each io module imports first in a fresh interpreter (an import circle fails this way)."""
    res = subprocess.run([sys.executable, "-c", f"import medsr.io.{module}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_batch_logic_is_library_code() -> None:
    """Walking inputs, output names and collisions live in medsr.batch (no click), shared by CLI and Ray."""
    batch = ROOT / "medsr" / "batch.py"
    assert not {m for m in _imports(batch) if m.split(".")[0] == "click" or m.startswith("medsr.cli")}
    for user in (ROOT / "medsr" / "scale" / "ray_batch.py", ROOT / "medsr" / "pacs" / "node.py"):
        assert not {m for m in _imports(user) if m.startswith("medsr.cli")}, f"{user.name} reaches up into the CLI"
    from medsr.batch import collect_jobs
    from medsr.cli import infer

    assert infer.collect_jobs is collect_jobs
