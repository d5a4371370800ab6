"""Benchmark: is the latent space worth more than a PCA of the pixels on RetinaMNIST?

RetinaMNIST (MedMNIST v2): real fundus photos at 28x28, 5 DR grades, official train/val/test.

    .venv/bin/python bench/eval_retinamnist.py \
        --npz ../shared/datasets/retinamnist/retinamnist.npz --work /tmp/rm \
        [--split val|test] [--seeds 0 1 2] [--epochs 30] [--set group.key=value ...]

Runs the real stages (ingest -> preprocess -> train -> evaluate) with the repository's params
plus the RetinaMNIST source, then prints the latent probe (mean +- sd over seeds) beside the
majority grade, raw-pixel and pixel-PCA probes on the same arrays (bench/probe_common.py) and
the published 28 px anchors. Choose settings with ``--split val``; report ``--split test`` once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_common  # noqa: E402

REFERENCES = {  # test split, 28 px
    "ResNet-18 supervised (MedMNIST v2)": {"probe_accuracy": 0.524, "probe_auc": 0.717},
    "best frozen foundation probe (MedMNIST+)": {"probe_accuracy": 0.54, "probe_auc": 0.734},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, required=True, help="retinamnist.npz")
    probe_common.add_arguments(parser)
    args = parser.parse_args()
    if not args.npz.is_file():
        raise SystemExit(f"{args.npz}: not found")
    # 28 px images: below the default ingest.min_size, which would quarantine them all
    updates = {
        "ingest": {
            "source": str(args.npz.resolve()),
            "modality": "fundus",
            "labels": None,
            "min_size": 28,
        },
        "preprocess": {"image_size": [28, 28]},
    }
    result = probe_common.run(args.work, updates, args)
    refs = REFERENCES if args.split == "test" else {}
    probe_common.report("RetinaMNIST", result, args.split, refs)


if __name__ == "__main__":
    main()
