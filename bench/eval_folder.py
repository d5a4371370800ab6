"""Benchmark: latent probe vs pixel baselines on a real labelled folder of images.

    .venv/bin/python bench/eval_folder.py --source DIR --labels LABELS.csv --work /tmp/idrid \
        [--size 128] [--modality fundus] [--split val|test] [--seeds 0 1 2] [--set k=v ...] \
        [--split-seeds 0 1 2 3 4]

``LABELS.csv`` has ``path,label`` (paths relative to DIR; optional patient_id, eye, split).
Without a split column, preprocess splits subjects 70/15/15 (seeded, stratified). Runs the real
stages, then prints the latent probe (mean +- sd over seeds) beside the majority label,
raw-pixel and pixel-PCA probes on the same arrays (bench/probe_common.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder of images")
    parser.add_argument("--labels", type=Path, required=True, help="CSV: path,label[,...]")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--modality", choices=("fundus", "oct"), default="fundus")
    probe_common.add_arguments(parser)
    args = parser.parse_args()
    for path in (args.source, args.labels):
        if not path.exists():
            raise SystemExit(f"{path}: not found")
    updates = {
        "ingest": {
            "source": str(args.source.resolve()),
            "labels": str(args.labels.resolve()),
            "modality": args.modality,
        },
        "preprocess": {"image_size": [args.size, args.size]},
    }
    if args.split_seeds:
        results = probe_common.run_splits(args.work, updates, args)
        for r in results:
            probe_common.report(f"{args.source.name}, preprocess.seed {r['split_seed']}", r,
                                args.split, {})  # fmt: skip
        probe_common.report_splits(args.source.name, results, args.split)
        return
    result = probe_common.run(args.work, updates, args)
    probe_common.report(args.source.name, result, args.split, {})


if __name__ == "__main__":
    main()
