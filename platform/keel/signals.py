"""SIGTERM as an exception, so that clean-up runs: what Kubernetes, Kubeflow and `kill` send to stop a process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM ends the process as an exception does (SystemExit 143), so that clean-up runs.

    Kubeflow terminating a run, and Kubernetes evicting or draining a node, send a step's pod SIGTERM, which
    ended Python on the spot: a register step stopped so left its new version in the registry (champion,
    even) under a run that had ended, its MLflow run RUNNING and its staging directory behind, and a train step
    left its Ray job training. `kill` did the same to a `keel` command (a `keel predict` left its staging
    directory). Off the main thread, where handlers cannot be set, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signal_number: int, _frame: Any) -> None:
        raise SystemExit(128 + signal_number)  # as a shell reports a process a signal ended

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
