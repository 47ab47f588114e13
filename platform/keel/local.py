"""Run a pipeline on this machine with ``kfp.local``, one subprocess per step.

The steps' own output goes to a log file under ``<home>/logs`` (or to the
terminal too with ``stream``); the first stage error recorded there becomes
the run's error, so the CLI can print one actionable line instead of a
traceback from a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from keel.runs import find_stage_error
from keel.settings import KeelSettings, make_directory


@dataclass(frozen=True)
class LocalRun:
    """How a local pipeline run ended."""

    run_id: str
    succeeded: bool
    wall_s: float
    log_path: Path
    error: dict[str, str] | None = None
    output: Any = None
    interrupted_by: int = 0  # the signal that stopped the run and its step: Ctrl-C's SIGINT, SIGTERM or SIGHUP

    @property
    def interrupted(self) -> bool:
        return self.interrupted_by != 0

    @property
    def exit_code(self) -> int:
        """What a shell reports for a command a signal ended: 130 after Ctrl-C, 143 after SIGTERM."""
        return 128 + self.interrupted_by if self.interrupted else 0 if self.succeeded else 1


PROGRESS = re.compile(r"Executing task|finished with status")


class _LogStream:
    """Everything to the log file; progress lines (or everything, when streaming) to the terminal too."""

    def __init__(self, log: TextIO, terminal: TextIO, stream_all: bool) -> None:
        self._log, self._terminal, self._stream_all = log, terminal, stream_all

    def write(self, text: str) -> int:
        self._log.write(text)
        if self._stream_all or PROGRESS.search(text):
            self._terminal.write(text)
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        self._terminal.flush()


def new_run_id(pipeline: str) -> str:
    """Sortable and unique: the pipeline, a UTC timestamp and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{pipeline.replace('_', '-')}-{stamp}-{secrets.token_hex(3)}"


def run_local(pipeline: Any, arguments: dict[str, Any], run_id: str, settings: KeelSettings,
              stream: bool = False) -> LocalRun:
    """Run ``pipeline`` with ``arguments`` through kfp.local's SubprocessRunner."""
    import warnings

    from kfp import local

    # kfp.local warns that our image is not a stock Python image; with use_venv=False the
    # steps run in this interpreter, which has the runtime image's packages installed.
    warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
    # and, for every step, that its CPU and memory requests and limits do not apply here: they are its pod's on a
    # cluster (the config's `resources`); on this machine the steps share what it has, one at a time.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
    log_path = make_directory(settings.home / "logs") / f"{run_id}.log"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(settings.home / "kfp"),
               raise_on_error=True)
    started = time.perf_counter()
    output, failure, interrupted_by = None, None, 0
    with log_path.open("w") as log, StepStopper() as stopper:
        with contextlib.redirect_stdout(_LogStream(log, sys.stderr, stream)):  # type: ignore[type-var]
            try:
                output = pipeline(**arguments, run_name=run_id).output
            except RuntimeError as e:  # kfp.local's "Task ... finished with status FAILURE"
                failure = str(e)
            except KeyboardInterrupt:  # Ctrl-C, or the stopper's SIGTERM or SIGHUP
                interrupted_by = stopper.signal_number or signal.SIGINT
                stopper.end_steps()
    wall_s = time.perf_counter() - started
    log_text = log_path.read_text() if failure is not None or interrupted_by else ""
    if interrupted_by:
        started_tasks = STARTED_TASK.findall(ANSI_COLOUR.sub("", log_text))
        how = "interrupted (Ctrl-C)" if interrupted_by == signal.SIGINT else \
            f"terminated ({signal.Signals(interrupted_by).name})"
        return LocalRun(run_id, False, wall_s, log_path, interrupted_by=interrupted_by,
                        error={"stage": started_tasks[-1] if started_tasks else "?", "error": how})
    if failure is None:
        return LocalRun(run_id, True, wall_s, log_path, output=output)
    error = find_stage_error(log_text) or crash_report(failure, log_text, log_path)
    return LocalRun(run_id, False, wall_s, log_path, error=error)


class StepStopper:
    """Ends the step that runs when this run is stopped, by Ctrl-C or by a signal to this process alone.

    Ctrl-C signals the terminal's whole process group, the step's process with it; SIGTERM or SIGHUP (``kill
    PID``, a closed terminal) reaches this process alone, and used to leave the step running on as an orphan,
    writing its outputs and MLflow run. Either way the step is sent SIGINT, as Ctrl-C sends it. A step need
    not end on it: Ray Train's driver answers SIGINT by asking its controller to abort, and training went on to
    its last epoch. So a step still running after ``grace_s`` is sent SIGTERM, then SIGKILL; the Ray processes
    it started share its fate.
    """

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s, self.signal_number = grace_s, 0
        self._before: set[int] = set()
        self._seen: set[int] = set()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StepStopper:
        self._before = set(_children(_process_table()))  # not the steps': e.g. a Ray head a test started
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {number: signal.signal(number, self._stop) for number in (signal.SIGTERM,
                                                                                      signal.SIGHUP)}
        return self

    def __exit__(self, *_: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _stop(self, signal_number: int, _frame: Any) -> None:
        self.signal_number = signal_number
        self._signal_steps(signal.SIGINT)
        raise KeyboardInterrupt  # exactly this class: subprocess.Popen would wait for the step on any other

    def end_steps(self) -> None:
        """After an interruption: wait for the steps to end, then make them."""
        for escalation, wait_s in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 5.0), (None, 5.0)):
            deadline = time.monotonic() + wait_s
            while self.steps() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.steps() or escalation is None:
                return
            print(f"keel: the running step went on {wait_s:.0f} s after it was told to stop; sending it "
                  f"{signal.Signals(escalation).name}", file=sys.stderr, flush=True)
            self._signal_steps(escalation)

    def steps(self) -> list[int]:
        """The live processes of the steps this run started, each with everything it started (kfp.local runs a
        step as ``sh -c`` and the step's Python under it, which starts Ray's), as Ctrl-C reaches them all. One
        seen before stays counted while it lives: its parent may have ended, leaving it to init."""
        table = _process_table()
        started = [pid for pid in _children(table) if pid not in self._before]
        self._seen.update(started + _descendants(started, table))
        return sorted(pid for pid in self._seen if pid in table)

    def _signal_steps(self, signal_number: int) -> None:
        for process in self.steps():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal_number)


def _process_table() -> dict[int, int]:
    """Each live process's parent, an ended one (a zombie kfp.local's Popen never waits for after the
    interruption) left out: from /proc on Linux, else from ``ps``."""
    if Path("/proc").is_dir():
        rows = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                rows.append([stat.parent.name, *stat.read_text().rsplit(")", 1)[1].split()[1::-1]])
            except (OSError, IndexError):  # a process that ended meanwhile
                continue
    else:
        with subprocess.Popen(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat="], stdout=subprocess.PIPE,
                              text=True) as ps:
            listed, _ = ps.communicate()
        rows = [row for row in (line.split()[:3] for line in listed.splitlines()) if row[0] != str(ps.pid)]
    return {int(pid): int(ppid) for pid, ppid, state in rows if not state.startswith("Z")}


def _children(table: dict[int, int]) -> list[int]:
    return [pid for pid, parent in table.items() if parent == os.getpid()]


def _descendants(roots: list[int], table: dict[int, int]) -> list[int]:
    found: list[int] = []
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, parent in table.items() if parent in frontier}
        found.extend(frontier)
    return found


FAILED_TASK = re.compile(r"Inner task failed: '([^']+)'|Task '([^']+)' finished with status FAILURE")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
STARTED_TASK = re.compile(r"Executing task '([^']+)'")
EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$", re.MULTILINE)


def crash_report(failure: str, log_text: str, log_path: Path) -> dict[str, str]:
    """A step that ended without a Keel error (a crash, a bug): the step kfp.local names and the last exception
    in the log, where its traceback is, instead of kfp.local's "? failed: Pipeline ... FAILURE"."""
    # kfp.local's failure names a task inside a condition; a top-level one only in its (coloured) log line
    named = FAILED_TASK.findall(failure) or FAILED_TASK.findall(ANSI_COLOUR.sub("", log_text))
    raised = EXCEPTION_LINE.findall(log_text)
    what = f"it raised {raised[-1].strip()}" if raised else "it crashed"
    return {"stage": next((name for name in named[-1] if name), "?") if named else "?",
            "error": f"{what}; the traceback is in {log_path}"}
