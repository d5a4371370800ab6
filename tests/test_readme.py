"""The README stays true: its params reference lists every key of params.yaml with its default,
and its Quickstart is the two commands CI runs."""

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(\w+\.\w+)` \| `(.*?)` \|", re.MULTILINE)


def _readme_params() -> dict[str, object]:
    return {key: json.loads(default) for key, default in ROW.findall(_readme())}


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_params_reference_has_every_key_with_its_default():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    expected = {f"{g}.{k}": v for g, values in raw.items() for k, v in values.items()}
    documented = _readme_params()
    assert sorted(set(expected) - set(documented)) == [], "keys missing from README"
    assert sorted(set(documented) - set(expected)) == [], "README documents unknown keys"
    wrong = {k: (documented[k], v) for k, v in expected.items() if documented[k] != v}
    assert wrong == {}, "README defaults differ from params.yaml"


def test_quickstart_is_the_two_make_commands_and_ci_runs_the_test_one():
    quickstart = _readme().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make repro", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert [ln for ln in ci.splitlines() if ln.strip().startswith("make")] == ["make test"]
