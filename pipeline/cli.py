"""``retina-vae``: one console script, one subcommand per stage module.

Each subcommand is a module with ``main(argv=None) -> int``; they are imported only when run,
so ``retina-vae --help`` is instant and lists only the commands that exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipeline.demo", "write the built-in synthetic OCT/fundus demo collection"),
    "sources": ("pipeline.sources", "fingerprint an external source folder and label sheet"),
    "ingest": ("pipeline.ingest", "find, decode, de-identify and check a folder of images"),
    "preprocess": ("pipeline.preprocess", "crop, resize and subject-split into uint8 arrays"),
    "train": ("pipeline.train", "train the conv-VAE with Ray Train, tracked in MLflow"),
    "evaluate": ("pipeline.evaluate", "test likelihood, latent maps and cluster metrics"),
    "encode": ("pipeline.encode", "write latent means of new images with a trained model"),
    "exps": ("pipeline.exps", "DVC experiments side by side: changed params, headline metrics"),
    "ui": ("pipeline.ui", "start the MLflow UI on the tracking store; print the newest run's page"),
}


def available() -> dict[str, tuple[str, str]]:
    """The commands whose module is present in this installation."""
    return {n: c for n, c in COMMANDS.items() if importlib.util.find_spec(c[0]) is not None}


def _usage(commands: dict[str, tuple[str, str]]) -> str:
    width = max(map(len, commands), default=0)
    lines = [f"  {n:<{width}}  {help_}" for n, (_, help_) in commands.items()]
    return (
        "usage: retina-vae COMMAND [--params FILE] [options]\n\n"
        "Learn a latent disease spectrum from retinal images (DVC + Ray Train + MLflow).\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "Run `retina-vae COMMAND --help` for a command's options; `dvc repro` runs them all.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(commands), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"retina-vae: error: unknown command {name!r}\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    return importlib.import_module(commands[name][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
