"""keel predict's two engines on one table: in one process (local) and on Ray Data (--ray).

The same registered model scores the same rows (2,000,000 by default; BENCH_ROWS, BENCH_PARTS) with each
engine, each in its own `keel predict` process, one after the other: the local engine from one Parquet file,
the ray engine from the same rows in part files. Measured: wall time of the whole command, and, sampled from
/proc, the peak private memory (RssAnon) of the command itself and of the largest process in its tree (Ray's
actors included), and the most object-store memory any process had resident (RssShmem, shared, so not added
up). The local engine reads the table whole, so its memory grows with the table; the ray engine streams
blocks through actors, so each process's memory should follow the part and batch size instead. On one 2-core
machine Ray's start-up is pure overhead: the time ratio is what that costs here, not what a cluster gains.
Prints one JSON report as its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, PARTS = int(os.environ.get("BENCH_ROWS", 2_000_000)), int(os.environ.get("BENCH_PARTS", 20))
REPO = Path(__file__).resolve().parents[2]


def descendants(root: int) -> set[int]:
    """``root`` and every process below it, from /proc's parent links."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def memory_mb(pid: int) -> tuple[float, float]:
    """The process's private resident memory (RssAnon) and its resident shared memory (RssShmem: for a Ray
    process, the pages of the object store it has touched, which every process mapping it counts again)."""
    fields: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssShmem:")):
                fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return fields.get("RssAnon", 0.0), fields.get("RssShmem", 0.0)


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def run_measured(command: list[str]) -> dict[str, float | str]:
    """Wall time; the peak private memory of the command itself and of the largest process in its tree; the
    most shared (object store) memory any of them had resident. Sampled from /proc every 0.1 s."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    private: dict[int, tuple[float, str]] = {}
    shared = 0.0
    while process.poll() is None:
        for pid in descendants(process.pid):
            anonymous, shmem = memory_mb(pid)
            shared = max(shared, shmem)
            if anonymous > private.get(pid, (0.0, ""))[0]:
                private[pid] = (anonymous, process_name(pid))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(process.stderr.read()[-3000:] if process.stderr else "keel predict failed")
    largest = max(private, key=lambda pid: private[pid][0])
    return {"wall_s": round(wall, 2), "driver_peak_private_mb": round(private[process.pid][0], 1),
            "largest_process_peak_private_mb": round(private[largest][0], 1), "largest_process": private[largest][1],
            "peak_shared_mb": round(shared, 1), "processes": len(private)}


def write_table(directory: Path) -> float:
    """ROWS rows of the small model's columns plus an id: as PARTS Parquet files in ``directory`` (what the ray
    engine reads) and as one file beside it (the local engine reads single files); returns the parts' MB."""
    import pandas as pd

    from tests.conftest import small_frame

    directory.mkdir()
    per_part, parts = ROWS // PARTS, []
    for number in range(PARTS):
        part = small_frame(per_part, seed=number).drop(columns=["outcome"])
        part.insert(0, "customer", [f"c-{number}-{i}" for i in range(per_part)])
        part.to_parquet(directory / f"part-{number:03d}.parquet", index=False)
        parts.append(part)
    pd.concat(parts, ignore_index=True).to_parquet(directory.with_suffix(".parquet"), index=False)
    return sum(p.stat().st_size for p in directory.iterdir()) / 1e6


def main() -> None:
    sys.path.insert(0, str(REPO))
    from keel.settings import load_settings
    from tests.stages import register_small_model

    with tempfile.TemporaryDirectory(prefix="keel-bench-batch-") as scratch:
        os.environ["KEEL_HOME"] = str(Path(scratch) / ".keel")
        register_small_model(load_settings(), "bench")
        table_mb = write_table(Path(scratch) / "table")
        table = Path(scratch) / "table"
        predict = [sys.executable, "-m", "keel", "predict", "models:/small-model@champion"]
        local = run_measured([*predict, str(table.with_suffix(".parquet")), str(Path(scratch) / "local"),
                              "--keep", "customer"])
        on_ray = run_measured([*predict, str(table), str(Path(scratch) / "ray"), "--keep", "customer", "--ray"])

    report = {"benchmark": "batch_scoring", "rows": ROWS, "parts": PARTS, "parquet_mb": round(table_mb, 1),
              "cpus": os.cpu_count(), "local": local, "ray": on_ray,
              "driver_peak_private_memory_ratio": round(on_ray["driver_peak_private_mb"]
                                                        / local["driver_peak_private_mb"], 3),
              "largest_process_peak_private_memory_ratio": round(on_ray["largest_process_peak_private_mb"]
                                                                 / local["largest_process_peak_private_mb"], 3),
              "wall_time_ratio": round(on_ray["wall_s"] / local["wall_s"], 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
