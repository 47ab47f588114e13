"""Run a pipeline on this machine with ``kfp.local``, one subprocess per step.

The steps' own output goes to a log file under ``<home>/logs`` (or to the
terminal too with ``stream``); the first stage error recorded there becomes
the run's error, so the CLI can print one actionable line instead of a
traceback from a subprocess.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sys
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
    interrupted: bool = False  # by Ctrl-C (SIGINT), which also ended the step running then


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
    output, failure, interrupted = None, None, False
    with log_path.open("w") as log:
        with contextlib.redirect_stdout(_LogStream(log, sys.stderr, stream)):  # type: ignore[type-var]
            try:
                output = pipeline(**arguments, run_name=run_id).output
            except RuntimeError as e:  # kfp.local's "Task ... finished with status FAILURE"
                failure = str(e)
            except KeyboardInterrupt:  # the step's process, in the same process group, got the SIGINT too
                interrupted = True
    wall_s = time.perf_counter() - started
    log_text = log_path.read_text() if failure is not None or interrupted else ""
    if interrupted:
        started_tasks = STARTED_TASK.findall(ANSI_COLOUR.sub("", log_text))
        return LocalRun(run_id, False, wall_s, log_path, interrupted=True,
                        error={"stage": started_tasks[-1] if started_tasks else "?", "error": "interrupted (Ctrl-C)"})
    if failure is None:
        return LocalRun(run_id, True, wall_s, log_path, output=output)
    error = find_stage_error(log_text) or crash_report(failure, log_text, log_path)
    return LocalRun(run_id, False, wall_s, log_path, error=error)


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
