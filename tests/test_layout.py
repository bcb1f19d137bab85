"""The layout's rules (DESIGN.md): the library imports without Ray; drivers and the service do
not import each other."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Shared Ray shells any driver may use; every other module of jobs/ is a stage's driver (or the
# pipeline and demo, which run the drivers).
SHARED = {"jobs.common", "jobs.training", "jobs.sharded", "jobs.segmenter_training"}
RUNNERS = {"jobs.pipeline", "jobs.demo"}  # they run the pipeline

NO_RAY = """
import importlib, importlib.abc, pkgutil, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoRay())
import maskdistill
names = [
    m.name
    for m in pkgutil.walk_packages(maskdistill.__path__, "maskdistill.")
    if m.name != "maskdistill.__main__"  # runs the command line
]
for name in names:
    importlib.import_module(name)
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
print(len(names))
"""


def test_every_library_module_imports_where_ray_cannot() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_RAY], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = {p.stem for p in (REPO / "maskdistill").rglob("*.py") if p.stem != "__init__"}
    assert int(done.stdout.split()[-1]) >= len(modules) - 1  # all but __main__'s package


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (`from jobs import mine` -> jobs.mine)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_no_stage_driver_imports_another_and_serve_imports_no_driver() -> None:
    drivers = {_module(p) for p in (REPO / "jobs").glob("*.py")} - SHARED - RUNNERS
    drivers.discard("jobs.__init__")
    assert {"jobs.mine", "jobs.cluster", "jobs.evaluate", "jobs.data"} <= drivers
    for path in (REPO / "jobs").glob("*.py"):
        if _module(path) not in RUNNERS:
            wrong = (_imports(path) & drivers) - {_module(path)}
            assert not wrong, f"{path.name} imports the drivers {sorted(wrong)}"
    for path in [*(REPO / "serve").glob("*.py"), *(REPO / "maskdistill").rglob("*.py")]:
        wrong = {name for name in _imports(path) if name.split(".")[0] == "jobs"}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_benchmarks_read_runs_without_importing_ray_for_it() -> None:
    for name in ("mask_quality.py", "mined_iou.py"):
        imported = _imports(REPO / "benchmarks" / name)
        assert not [m for m in imported if m.split(".")[0] in ("jobs", "ray")], name
