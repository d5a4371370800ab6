"""dvc.yaml stays true to the code: each stage depends on the code it runs and on the params
that shape its outputs, and not on the ones that only change how it runs."""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from pipeline.cli import COMMANDS
from pipeline.params import Params
from pipeline.train import OPERATIONAL

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "vae_core")
# The shell every stage shares (argument parsing, params validation, one-line errors): it
# changes no output, and listing it would re-run the whole pipeline for a new params key.
SHELL = {"pipeline/stage.py", "pipeline/params.py", "pipeline/errors.py"}
KEYED = ("train", "tracking", "cluster")  # groups the train stage lists key by key


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> str | None:
    """``pipeline.io`` -> ``pipeline/io.py`` when it is a project module, else None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if (REPO / candidate).is_file():
            return candidate.as_posix()
    return None


def _imports(path: str) -> set[str]:
    """The project modules one file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {f for f in map(_module_file, names) if f}
    return found


def _closure(path: str) -> set[str]:
    """``path`` and every project module it imports, transitively."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_imports(current))
    return seen


def _covered(module: str, deps: list[str]) -> bool:
    return any(module == dep or module.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_every_stage_depends_on_the_code_it_imports():
    missing = {}
    for name, stage in _stages().items():
        command = stage["cmd"].split()[-1]  # "python -m pipeline.cli train" -> train
        code = _closure(_module_file(COMMANDS[command][0]))
        needed = {m for m in code - SHELL if not m.endswith("__init__.py")}
        lacking = sorted(m for m in needed if not _covered(m, stage["deps"]))
        if lacking:
            missing[name] = lacking
    assert missing == {}, "dvc.yaml: add these to the stage's deps"


def test_import_walk_sees_transitive_and_function_level_imports():
    code = _closure("pipeline/train.py")
    assert {"pipeline/figures.py", "vae_core/checkpoint.py", "vae_core/model.py"} <= code
    assert "pipeline/figures.py" in _closure("pipeline/evaluate.py")


def test_train_params_are_listed_key_by_key_or_operational():
    """Every key of the train, tracking and cluster groups is either a dependency of the train
    stage (a change retrains) or in train.OPERATIONAL (a change resumes), never both; the
    model group, all of whose keys shape the model, stays a whole-group dependency."""
    listed = set(_stages()["train"]["params"])
    types = get_type_hints(Params)
    keys = {f"{g}.{f.name}" for g in KEYED for f in fields(types[g])}
    assert "model" in listed and not listed & set(KEYED), "list train/tracking/cluster by key"
    assert sorted(listed & OPERATIONAL) == [], "operational keys must not re-run train"
    assert sorted(OPERATIONAL - keys) == [], "train.OPERATIONAL names unknown keys"
    unknown = {k for k in listed if k.split(".")[0] in KEYED} - keys
    assert sorted(unknown) == [], "dvc.yaml train params names unknown keys"
    undecided = keys - listed - OPERATIONAL
    assert sorted(undecided) == [], "add to dvc.yaml train params or to train.OPERATIONAL"


def test_stages_stand_on_shared_modules_not_on_each_other():
    """A stage module imports shared modules only: no stage is another stage's library."""
    stages = {_module_file(module) for module, _ in COMMANDS.values()}
    for stage in stages:
        assert _imports(stage) & stages == set(), f"{stage} imports another stage"
    shared = {str(p.relative_to(REPO)) for p in (REPO / "pipeline").glob("*.py")} - stages
    for module in shared:
        assert _imports(module) & stages == set(), f"{module} imports a stage"


def test_only_tracking_talks_to_mlflow():
    for path in sorted((REPO / "pipeline").glob("*.py")) + sorted((REPO / "vae_core").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        if any(name.split(".")[0] == "mlflow" for name in names):
            assert path.name == "tracking.py", f"{path.name} imports mlflow"


# ----------------------------------------------------------------------------- the baseline

# What `make baseline` commits: the lock and every metrics output of a reference run
BASELINE = ["metrics/ingest.json", "metrics/preprocess.json", "metrics/train.json",
            "metrics/train_history.csv", "metrics/eval.json"]  # fmt: skip


def _git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout


def test_the_baseline_is_committed_and_is_the_run_the_lock_records():
    """dvc.lock and metrics/ are in git, and each committed metrics file is the one the lock
    records (same md5): the baseline's numbers come from the run whose hashes it holds."""
    tracked = set(_git("ls-files", "dvc.lock", "metrics").split())
    assert {"dvc.lock", *BASELINE} <= tracked, "run `make baseline` and commit what it stages"
    lock = yaml.safe_load(_git("show", "HEAD:dvc.lock"))
    recorded = {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }
    for path in BASELINE:
        committed = subprocess.run(
            ["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, check=True
        ).stdout
        assert hashlib.md5(committed).hexdigest() == recorded[path], path


@pytest.mark.slow
def test_a_fresh_clone_compares_against_numbers(tmp_path):
    """`dvc exp show` and `dvc metrics diff` in a fresh clone of this repository: the baseline
    row holds the committed run's metrics (no `!`, no 'failed to load')."""
    clone = tmp_path / "clone"
    _git("clone", "-q", str(REPO), str(clone), cwd=tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=clone, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert "failed to load" not in done.stderr, done.stderr
        return done

    committed = json.loads((clone / "metrics/eval.json").read_text())
    rows = list(csv.DictReader(io.StringIO(run("dvc", "exp", "show", "--csv").stdout)))
    (base,) = [row for row in rows if row["rev"] != "workspace"]
    assert float(base["test_neg_elbo"]) == pytest.approx(committed["test_neg_elbo"])
    assert float(base["val.neg_elbo"]) > 0
    run("dvc", "metrics", "diff")  # nothing changed: no output, no error
    lines = run("retina-vae", "exps").stdout.splitlines()
    assert f"{committed['test_iwae']:.1f}" in lines[3].split()  # the baseline row
