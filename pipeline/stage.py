"""The shared shell of every stage command: ``--params``, logging, one-line errors."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from pipeline.errors import UserError
from pipeline.io import remove_stale_temporaries
from pipeline.params import Params, load_params, redact_uri

log = logging.getLogger("retina_vae")


def _redacted(record: logging.LogRecord) -> bool:
    """A handler filter: the record's message with every URI's password or token redacted
    (:func:`pipeline.params.redact_uri`), whichever logger wrote it (MLflow's own too)."""
    message = record.getMessage()
    safe = redact_uri(message)
    if safe != message:
        record.msg, record.args = safe, None
    return True


def redact_logs() -> None:
    """Redact URI secrets in every line the root logger's handlers write (idempotent); also
    called on the Ray worker that logs a run's epochs, whose handlers Ray set up."""
    for handler in logging.getLogger().handlers:
        if _redacted not in handler.filters:
            handler.addFilter(_redacted)


def setup_logging(level: int = logging.INFO) -> None:
    """Plain ``name: message`` lines on stderr, URI secrets redacted; quiet third-party loggers."""
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    redact_logs()
    for noisy in ("ray", "mlflow", "alembic", "urllib3", "matplotlib", "PIL", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(
    name: str,
    argv: Sequence[str] | None,
    body: Callable[[Params, argparse.Namespace], None],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
    needs_params: bool = True,
) -> int:
    """Parse ``--params`` (and stage flags), load params once, run ``body``; return exit code.

    ``needs_params=False``: ``body`` gets None and the params file is not read (a command that
    must work while params.yaml is invalid, such as comparing experiments after a failed one).
    A :class:`UserError` (bad params, bad input, unusable environment) ends the stage with one
    line ``retina-vae <name>: error: ...`` and exit code 1 instead of a traceback.
    """
    parser = argparse.ArgumentParser(prog=f"retina-vae {name}", description=_plain(description))
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    # Arrow (tables, parquet) from the system allocator, which gives freed buffers back: Arrow's
    # default pool (mimalloc) keeps them, and a stage's peak memory then grows with its tables
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        params = load_params(args.params) if needs_params else None
        if params is not None:
            _remove_stale_temporaries(params)
        body(params, args)  # type: ignore[arg-type]
    except UserError as exc:
        print(f"retina-vae {name}: error: {redact_uri(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"retina-vae {name}: interrupted", file=sys.stderr)
        return 130
    return 0


def _plain(summary: str | None) -> str | None:
    """A module docstring's summary as --help shows it: no ``retina-vae X``: prefix, no
    reStructuredText literal quotes."""
    if summary is None:
        return None
    text = re.sub(r"^(Stage )?``retina-vae \w+``: ", "", summary)
    return text.replace("``", "`")


def _remove_stale_temporaries(params: Params) -> None:
    """Temporaries that killed stages left beside (or in) any output path of ``params``."""
    outputs = [Path(p) for k, p in params.flat().items() if k.startswith("paths.")]
    freed = remove_stale_temporaries(sorted({*outputs, *(p.parent for p in outputs)}))
    if freed:
        log.info("freed %.1f MB of stale temporary outputs", freed / 1e6)
