"""Child processes in tests: `python -m keel ...` with a bound on its time, and the process tree under a pid.

A `keel run` starts more than itself: kfp.local runs each step as a subprocess, and a step starts a private
Ray (GCS, raylet, workers). Killing only the `keel` process on a timeout left the hung step and its Ray
running for the rest of the session, taking the cores the next tests needed, and told nothing of where it
hung. :func:`keel` ends the whole tree and fails the test with every process's Python stack instead.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

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


def ray_actor_pids(class_name: str) -> list[int]:
    """PIDs of this test process's Ray actor processes of a class (Ray titles them ``ray::<class>...``).

    Only descendants of this process (its local Ray's workers), so that a test killing them never hits
    the Ray of a test running beside it. Read from /proc rather than Ray's state API, which needs the
    dashboard the tests run without.
    """
    return processes_titled(f"ray::{class_name}", lambda pid, parents: descends_from(pid, os.getpid(), parents))


def processes_titled(prefix: str, belongs: Callable[[int, dict[int, int]], bool]) -> list[int]:
    """PIDs of the processes whose command line (a Ray worker's title) starts with ``prefix`` and that
    ``belongs(pid, parents)`` accepts; one that ends while we look is left out."""
    parents = process_parents()
    found = []
    for pid in parents:
        try:
            if command_line(pid).startswith(prefix) and belongs(pid, parents):
                found.append(pid)
        except ProcessLookupError:
            continue
    return found


def modules_loaded_by(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh Python has loaded after running ``statement`` (an import, say): what a
    process pays at start-up, which this test process, with everything already imported, cannot show."""
    probe = f"import sys\n{statement}\nprint(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", "import json\n" + probe], capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    return list(json.loads(loaded.stdout.strip().splitlines()[-1]))


def process_children() -> dict[int, list[int]]:
    """The child pids of every process on the machine (that has any)."""
    children: dict[int, list[int]] = {}
    for pid, parent in process_parents().items():
        children.setdefault(parent, []).append(pid)
    return children


def process_tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """``root`` and every process under it, parents first (``children``: one reading of /proc for many trees)."""
    children = process_children() if children is None else children
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


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


STEP_FUNCTION = re.compile(r"--function_to_execute\s+(\w+)")


def private_memory_kib(pid: int) -> int:
    """Resident anonymous and shared (shm: Ray's object store) memory of a process, from the kernel's counters
    (cheap to read, unlike smaps, which walks page tables and slows the process it reads): what a pod's memory
    cgroup holds for it beyond reclaimable file pages. Shared pages count once per process mapping them, so a
    sum over processes errs high. 0 once the process ended."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return 0
    fields = dict(line.split()[:2] for line in status.splitlines() if line.startswith(("RssAnon:", "RssShmem:")))
    return sum(int(value) for value in fields.values())


class Sampling:
    """Calls :meth:`sample` every ``interval_s`` on a thread while the ``with`` block runs: what it sees of
    processes that live shorter than that can be missed."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class ActorProcesses(Sampling):
    """Every process that ran a Ray actor of ``class_name`` for this test process while the block ran.
    An actor process costs seconds to start (it imports Ray, torch, pandas), so it is never missed."""

    def __init__(self, class_name: str, interval_s: float = 0.1) -> None:
        super().__init__(interval_s)
        self.class_name = class_name
        self.pids: set[int] = set()

    def sample(self) -> None:
        self.pids.update(ray_actor_pids(self.class_name))


class StepMemory(Sampling):
    """The peak private memory of each kfp.local step under ``root``, its whole process tree (a local Ray
    included), sampled every ``interval_s`` while the run goes on. The shortest step (validate, under a
    second) was missed at 1 s."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        super().__init__(interval_s)
        self.root = root
        self.peak_mib: dict[str, float] = {}

    def sample(self) -> None:
        children = process_children()
        tree = process_tree(self.root, children)
        steps = {pid: match.group(1) for pid in tree if (match := STEP_FUNCTION.search(command_line(pid)))}
        for pid, function in steps.items():
            if any(pid in children.get(step, []) for step in steps):  # the step's Python under kfp's `sh -ec`
                continue
            total = sum(private_memory_kib(p) for p in process_tree(pid, children))
            name = function.replace("_", "-")  # the step's name in the Kubeflow UI
            self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), total / 1024)


@dataclass(frozen=True)
class MeasuredRun:
    """A successful `keel run`, its JSON report, and each step's peak private memory (MiB)."""

    pipeline: str
    workdir: Path
    config: str | None  # the --config file in workdir
    report: dict
    step_memory: dict[str, float]


def run_measuring_steps(pipeline: str, workdir: Path, config_text: str | None = None,
                        env: dict[str, str] | None = None) -> MeasuredRun:
    """`keel run PIPELINE` in ``workdir`` (its own KEEL_HOME), with ``config_text`` as its --config, sampling
    each step's memory; fails the test unless the run succeeded."""
    arguments = ["run", pipeline, "--output", "json"]
    config = None
    if config_text is not None:
        config = "reduced.yaml"
        (workdir / config).write_text(config_text)
        arguments += ["--config", config]
    process = start_keel(*arguments, cwd=workdir, env={"KEEL_HOME": str(workdir / ".keel"), **(env or {})})
    with StepMemory(process.pid) as memory:
        result = finish(process)
    assert result.returncode == 0, result.stderr[-3000:]
    return MeasuredRun(pipeline, workdir, config, json.loads(result.stdout), memory.peak_mib)


def steps_over_their_memory_limit(run: MeasuredRun) -> dict[str, str]:
    """Each measured step whose peak is above the memory limit its pod gets on a cluster (the pipeline's
    config, with the run's --config merged over it), as "PEAK MiB > LIMIT"."""
    import pipelines
    from keel.config import load_pipeline_config
    from keel.resources import memory_bytes

    module = importlib.import_module(pipelines.PIPELINES[run.pipeline])
    resolved = load_pipeline_config(module.CONFIG_FILE, run.workdir / run.config if run.config else None)
    over = {}
    for step, peak in run.step_memory.items():
        limit = resolved.step_resources(step).limits.memory
        if limit is not None and peak * 2**20 > memory_bytes(limit):
            over[step] = f"{peak:.0f} MiB > {limit}"
    return over
