"""The console script: `retina-vae --help` lists the stage commands; unknown ones fail clearly."""

import subprocess
import sys
from pathlib import Path

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
