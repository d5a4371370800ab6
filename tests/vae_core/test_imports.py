"""vae_core stays a pure-PyTorch library: Ray only in distributed.py, no pipeline tooling."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import vae_core

PACKAGE = Path(vae_core.__file__).parent
PURE_MODULES = [
    "vae_core",
    "vae_core.model",
    "vae_core.elbo",
    "vae_core.checkpoint",
    "vae_core.training",
]
FORBIDDEN = ["ray", "mlflow", "dvc", "yaml", "pandas", "pipeline"]


def _imported_roots(path: Path) -> set[str]:
    """Top-level package names a source file imports (absolute imports only)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_pure_modules_load_no_pipeline_tooling():
    # A fresh interpreter: this test process may already hold ray or pandas from other tests.
    code = (
        "import importlib, json, sys\n"
        f"for name in {PURE_MODULES!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_only_distributed_imports_ray():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert {p.name for p in sources} >= {"model.py", "elbo.py", "checkpoint.py", "training.py"}
    importers = {p.relative_to(PACKAGE).as_posix() for p in sources if "ray" in _imported_roots(p)}
    assert importers <= {"distributed.py"}


def test_no_vae_core_module_imports_pipeline_tooling():
    for path in sorted(PACKAGE.rglob("*.py")):
        banned = _imported_roots(path) & {"mlflow", "dvc", "yaml", "pandas", "pipeline"}
        assert not banned, f"{path.name} imports {sorted(banned)}"


def test_static_scan_sees_imports():
    # Guard the guard: the scanner must notice both import forms.
    probe = Path(__file__)
    assert {"ast", "json", "vae_core", "pathlib"} <= _imported_roots(probe)
