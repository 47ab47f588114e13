"""`make`'s choice of Python for the venvs: what a newcomer's first `make demo` meets before anything is installed.

Each test runs the real Makefile with a PATH that holds only the Pythons it names, so the machine's own
Python 3.11 cannot answer for them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make") or "make"  # `make test` runs these, so make is there


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The Makefile and the two files its variables read, with nothing installed beside them."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "platform" / "keel").mkdir(parents=True)
    for name in ("__init__.py", "images.py"):
        shutil.copy(REPO / "platform" / "keel" / name, tmp_path / "platform" / "keel" / name)
    for name in ("pyproject.toml", "requirements.lock"):
        (tmp_path / name).touch()
    (tmp_path / "bin").mkdir()
    os.symlink(shutil.which("sed") or "/bin/sed", tmp_path / "bin" / "sed")
    return tmp_path


def put_on_path(checkout: Path, name: str, *, runs: bool) -> Path:
    """A ``name`` on the test's PATH: this interpreter when it ``runs``, or one that fails as pyenv's shim does for
    a version it lacks (or a Python too old for Keel's check)."""
    program = checkout / "bin" / name
    if runs:
        os.symlink(sys.executable, program)
    else:
        program.write_text("#!/bin/sh\necho \"pyenv: $0: command not found\" >&2\nexit 127\n")
        program.chmod(0o755)
    return program


def make(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(checkout / "bin"), "HOME": str(checkout)}
    return subprocess.run([MAKE, "--no-print-directory", *args], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=60)


def chosen_python(checkout: Path) -> str:
    database = make(checkout, "-p", "-n", "-q", "venv").stdout
    return next(line.split(":=", 1)[1].strip() for line in database.splitlines() if line.startswith("PYTHON :="))


def test_make_takes_the_first_python_on_path_that_runs(checkout: Path) -> None:
    put_on_path(checkout, "python3.11", runs=False)
    put_on_path(checkout, "python3.12", runs=True)
    put_on_path(checkout, "python3.13", runs=True)
    assert chosen_python(checkout) == "python3.12"


def test_make_prefers_python_3_11_the_runtime_images(checkout: Path) -> None:
    put_on_path(checkout, "python3", runs=True)
    put_on_path(checkout, "python3.11", runs=True)
    assert chosen_python(checkout) == "python3.11"


def test_without_a_supported_python_make_says_so_and_makes_no_venv(checkout: Path) -> None:
    put_on_path(checkout, "python3", runs=False)
    result = make(checkout, "demo")
    assert result.returncode != 0
    assert "Keel needs Python 3.11, 3.12 or 3.13; none of python3.11, python3.12, python3.13 or python3" in result.stderr
    assert "make PYTHON=/path/to/python3.12 demo" in result.stderr
    assert not (checkout / ".venv").exists()


def test_a_named_python_that_is_not_supported_is_named_in_the_error(checkout: Path) -> None:
    old = put_on_path(checkout, "python3.10", runs=False)
    result = make(checkout, f"PYTHON={old}", "venv")
    assert result.returncode != 0
    assert f"{old} is not one" in result.stderr
    assert not (checkout / ".venv").exists()
