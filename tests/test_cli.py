"""The console script: `retina-vae --help` lists the stage commands; unknown ones fail clearly."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, available, main


def test_help_lists_every_available_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in available():
        assert f"  {name} " in out


def test_every_declared_command_exists():
    assert set(available()) == set(COMMANDS)


def test_unknown_command_is_one_clear_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_installed_console_script_runs():
    script = Path(sys.executable).parent / "retina-vae"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "commands:" in result.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_is_plain_text_and_a_whole_sentence(capsys, name):
    """`retina-vae X --help` shows the stage's summary as prose: no reStructuredText quotes, no
    repeated `retina-vae X:` prefix, and a sentence that ends (not cut at a line break)."""
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.split("\n\n")
    summary = " ".join(lines[1].split())  # the description paragraph after the usage
    assert "``" not in summary and not summary.startswith(("retina-vae", "Stage"))
    assert summary.endswith("."), summary


LIBRARY_LINE = """
import logging
from pipeline.stage import setup_logging
setup_logging()
logging.getLogger("mlflow.store").warning("no answer from %s (%s)",
    "http://alice:s3cret@mlflow.lab:5000", "postgresql://bob:pw2@db/mlflow?token=t0k")
"""


def test_a_library_log_line_never_shows_a_uri_password():
    """A stage's log handlers redact a password or token in any line, a library's too."""
    result = subprocess.run([sys.executable, "-c", LIBRARY_LINE], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stderr.strip() == (
        "mlflow.store: no answer from http://alice:<redacted>@mlflow.lab:5000 "
        "(postgresql://bob:<redacted>@db/mlflow?token=<redacted>)"
    )
