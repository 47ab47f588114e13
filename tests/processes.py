"""Child processes in tests: `python -m keel ...` with a bound on its time, and the process tree under a pid.

A `keel run` starts more than itself: kfp.local runs each step as a subprocess, and a step starts a private
Ray (GCS, raylet, workers). Killing only the `keel` process on a timeout left the hung step and its Ray
running for the rest of the session, taking the cores the next tests needed, and told nothing of where it
hung. :func:`keel` ends the whole tree and fails the test with every process's Python stack instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A bound on a hang, not a timing: the full demo took 193 s beside another test here, over 300 s on a slower CI
KEEL_TIMEOUT_S = 600


def process_parents() -> dict[int, int]:
    """Parent pid of every process on the machine, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the parent pid is the 2nd field after the ")" closing the command name
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended while we looked
                continue
    return parents


def descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    seen = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        if pid == ancestor:
            return True
    return False


def process_tree(root: int) -> list[int]:
    """``root`` and every process under it, parents first."""
    parents = process_parents()
    return [root] + sorted(pid for pid in parents if descends_from(pid, root, parents))


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(ended)"


def python_stacks(pids: list[int], limit_per_process: int = 4000) -> str:
    """Each process's command line and, for Python ones, its threads' stacks (py-spy, beside this Python)."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    report = []
    for pid in pids:
        report.append(f"--- pid {pid}: {command_line(pid)[:300]}")
        if spy is None:
            continue
        try:
            dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
            report.append((dump.stdout or dump.stderr)[-limit_per_process:])
        except subprocess.TimeoutExpired:
            report.append("(py-spy did not answer in 30 s)")
    return "\n".join(report)


def end_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_keel(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m keel ARGS`` started, its output piped; :func:`finish` waits for it."""
    return subprocess.Popen([sys.executable, "-m", "keel", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finish(process: subprocess.Popen, timeout_s: float = KEEL_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Its output once it ends; past ``timeout_s`` the test fails with the stacks of the tree it started."""
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        tree = process_tree(process.pid)
        stacks = python_stacks(tree)
        end_tree(tree)
        stdout, stderr = process.communicate()
        pytest.fail(f"`{' '.join(map(str, process.args[1:]))}` did not finish in {timeout_s:.0f} s.\n"
                    f"Its stderr, last lines:\n{stderr[-3000:]}\nIts processes when it was stopped:\n{stacks}",
                    pytrace=False)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def keel(*args: str, cwd: Path, env: dict[str, str] | None = None,
         timeout_s: float = KEEL_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m keel ARGS`` to its end, bounded as :func:`finish` bounds it."""
    return finish(start_keel(*args, cwd=cwd, env=env), timeout_s)
