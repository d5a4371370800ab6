"""``retina-vae exps``: DVC experiments side by side, the metrics that matter, in 120 columns.

``dvc exp show`` lists every param and every metric (about 150 columns: a wall of ``…`` in a
terminal). This reads the same table (``dvc exp show --json``) and prints one line per row
(the workspace, each baseline commit and its experiments) with the params that differ from
the row's baseline commit and the headline metrics of :data:`HEADLINE`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import Counter
from typing import Any

from pipeline.errors import UserError
from pipeline.params import REDACTED, SECRETS, Params, redact_uri
from pipeline.stage import run_stage

WIDTH = 120  # characters per line
# (metrics file, dotted key as `dvc metrics show` names it, column header, format)
HEADLINE = (
    ("metrics/train.json", "val.neg_elbo", "val -ELBO", "{:.2f}"),
    # the IWAE bound on log p(x), nats per image: every likelihood has it (bits/dim only the
    # densities, not the default Bernoulli)
    ("metrics/eval.json", "test_iwae", "test IWAE", "{:.1f}"),
    ("metrics/eval.json", "test_active_units", "active", "{:.0f}"),
    ("metrics/eval.json", "test_probe_auc", "probe AUC", "{:.3f}"),
    ("metrics/eval.json", "test_probe_auc_vs_pca", "vs PCA", "{:+.3f}"),
)
NAME_WIDTH = 20


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, as DVC names nested params and metrics."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _files(data: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """``{file: flat values}`` of one row's params or metrics (files DVC could not read: {})."""
    return {f: flatten(v.get("data") or {}) for f, v in (data.get(kind) or {}).items()}


def rows(exp_show: list[dict[str, Any]]) -> list[tuple[str, dict, dict, dict]]:
    """``dvc exp show --json`` as (name, params, metrics, baseline params) per row: each
    baseline (workspace, commits) then its experiments; params flat as ``file:key``."""
    out = []
    for entry in exp_show:
        data = entry.get("data") or {}
        name = "workspace" if entry["rev"] == "workspace" else entry.get("name") or entry["rev"][:7]
        base = _params(data)
        out.append((name, base, _files(data, "metrics"), base))
        for exp in entry.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            exp_data = rev.get("data") or {}
            label = f"└ {exp.get('name') or rev.get('name') or rev.get('rev', '')[:7]}"
            out.append((label, _params(exp_data), _files(exp_data, "metrics"), base))
    if len(out) > 1 and out[0][0] == "workspace":  # the workspace differs from HEAD (next row)
        name, params, metrics, _ = out[0]
        out[0] = (name, params, metrics, out[1][1])
    return out


def _params(data: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value for values in _files(data, "params").values() for key, value in values.items()
    }


def changes(params: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """``key=value`` for each param that differs from ``base``, sorted by key; secrets shown
    as ``<redacted>`` (:data:`pipeline.params.SECRETS`, a URI's password: an experiment made
    before they were refused in params still holds them)."""
    return [
        f"{k}={_shown(k, v)}" for k, v in sorted(params.items()) if _value(base.get(k)) != _value(v)
    ]


def _shown(key: str, value: Any) -> str:
    return REDACTED if key in SECRETS and value is not None else redact_uri(_value(value))


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _metric(metrics: dict[str, dict[str, Any]], file: str, key: str, fmt: str) -> str:
    value = metrics.get(file, {}).get(key)
    if not isinstance(value, (int, float)):
        return "-"
    return "nan" if math.isnan(value) else fmt.format(value)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(exp_show: list[dict[str, Any]], width: int = WIDTH) -> str:
    """The comparison as text lines of at most ``width`` characters."""
    widths = [max(len(header), 9) for _, _, header, _ in HEADLINE]
    params_width = width - NAME_WIDTH - sum(w + 2 for w in widths) - 2
    headers = [f"{h:>{w}}" for (_, _, h, _), w in zip(HEADLINE, widths, strict=True)]
    lines = [f"{'experiment':<{NAME_WIDTH}}  " + "  ".join(headers) + "  params changed"]
    table_rows = [(name, metrics, changes(p, base)) for name, p, metrics, base in rows(exp_show)]
    # What tells the rows apart comes first: a change fewer rows share is listed before one
    # that more share (such as quick settings given to every variant), so a cut line keeps it.
    shared = Counter(change for _, _, row_changes in table_rows for change in row_changes)
    for name, metrics, row_changes in table_rows:
        cells = [
            f"{_metric(metrics, f, k, fmt):>{w}}"
            for (f, k, _, fmt), w in zip(HEADLINE, widths, strict=True)
        ]
        line = f"{_cut(name, NAME_WIDTH):<{NAME_WIDTH}}  " + "  ".join(cells)
        listed = " ".join(sorted(row_changes, key=lambda c: (shared[c], c)))
        lines.append((line + "  " + _cut(listed, params_width)).rstrip())
    lines.insert(1, "-" * max(map(len, lines)))
    return "\n".join(lines)


def exp_show(extra: list[str]) -> list[dict[str, Any]]:
    """``dvc exp show --json`` (with ``extra`` options) in the current repository."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"dvc exp show: {first}")
    return json.loads(done.stdout)


def _body(params: Params | None, args: argparse.Namespace) -> None:
    extra = ["-A"] if args.all_commits else []
    extra += ["-n", str(args.num)] if args.num else []
    print(table(exp_show(extra)))


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-A", "--all-commits", action="store_true", help="every commit's")
    parser.add_argument("-n", "--num", type=int, help="the last N commits (dvc exp show -n)")


def main(argv: list[str] | None = None) -> int:
    # params.yaml is not read: after a failed `dvc exp run -S key=bad` it still holds the bad
    # value, and comparing the experiments is what the user needs then
    return run_stage(
        "exps", argv, _body, _add_args, description=__doc__.splitlines()[0], needs_params=False
    )
