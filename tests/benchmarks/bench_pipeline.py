"""Local pipeline wall time against the sum of its stages' own compute.

Runs `keel run medical_diagnosis` in a fresh working directory. A stage's own
compute is timed inside its component, from the component body's start to its
output being published (libraries it loads included); the rest of the wall
time is what kfp.local adds: a subprocess, an interpreter and KFP's executor
per step. Prints one JSON report as its last line. Goal: ratio <= 1.3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-pipeline-") as workdir:
        env = {**os.environ, "KEEL_HOME": str(Path(workdir) / ".keel")}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "keel", "run", "medical_diagnosis", "--output", "json"],
                                cwd=workdir, env=env, capture_output=True, text=True, check=False)
        command_s = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        raise SystemExit("the pipeline failed; no measurement")
    summary = json.loads(result.stdout)
    compute_s = sum(stage["duration_s"] for stage in summary["stages"])
    report = {
        "benchmark": "pipeline", "pipeline": "medical_diagnosis",
        "stages_s": {stage["stage"]: stage["duration_s"] for stage in summary["stages"]},
        "stage_compute_s": round(compute_s, 2), "pipeline_wall_s": summary["wall_s"],
        "command_wall_s": round(command_s, 2),
        "wall_to_compute_ratio": round(summary["wall_s"] / compute_s, 3),
        "command_to_compute_ratio": round(command_s / compute_s, 3),
        "test_accuracy": summary["test_metrics"]["accuracy"],
        "goals": {"wall_to_compute_ratio": "<= 1.3"},
    }
    report["goals_met"] = report["wall_to_compute_ratio"] <= 1.3
    print(json.dumps(report))


if __name__ == "__main__":
    main()
