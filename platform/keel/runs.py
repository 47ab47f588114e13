"""What a component needs to run one stage of one pipeline run.

A component calls :func:`open_stage` with the run name and the pipeline
config it was given, then one stage function. Outputs of run ``R`` live under
``<artifact root>/runs/R/<stage>``: runs never share a path, and a retried
stage publishes to the same place it would have the first time.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from keel import storage
from keel.config import AnyPipelineConfig, parse_pipeline_config
from keel.errors import KeelError
from keel.settings import KeelSettings, load_settings
from keel.signals import sigterm_raises

ERROR_MARKER = "KEEL-STAGE-ERROR "
STAGE_ORDER = ("check", "ingest", "validate", "preprocess", "tune", "train", "compress", "evaluate", "register",
               "predict")


@dataclass(frozen=True)
class StageRun:
    """One stage of one pipeline run: settings, validated config and output location."""

    stage: str
    run_id: str
    config: AnyPipelineConfig
    settings: KeelSettings

    @property
    def output_uri(self) -> str:
        return storage.stage_uri(self.settings, self.run_id, self.stage)

    @property
    def run_uri(self) -> str:
        return storage.run_uri(self.settings, self.run_id)


def resolve_run_id(run_name: str, job_id: str) -> str:
    """The run's name when one was given (``keel run`` gives one), else the KFP job id."""
    return run_name or job_id


@contextmanager
def open_stage(stage: str, run_name: str, job_id: str, config: str) -> Iterator[StageRun]:
    """Validate settings and config, then run the block; a KeelError ends the process cleanly.

    The error's headline goes to the log behind :data:`ERROR_MARKER`, where
    ``keel run`` finds it, and the process exits 1 without a traceback: the
    headline says what to fix, and a traceback would bury it.
    """
    clock = storage.STAGE_STARTED_AT.set(time.time())
    run: StageRun | None = None
    try:
        with sigterm_raises():
            settings = load_settings()
            run = StageRun(stage, resolve_run_id(run_name, job_id),
                           parse_pipeline_config(config, "the pipeline's config parameter"), settings)
            yield run
            _push_metrics(run, failed=False)
    except KeelError as e:
        print(ERROR_MARKER + json.dumps({"stage": stage, "error": e.headline}), flush=True)
        print(f"keel: {stage} failed: {e.headline}", file=sys.stderr, flush=True)
        if run is not None:
            _push_metrics(run, failed=True)
        raise SystemExit(1) from None
    except Exception:
        if run is not None:  # a crash is a failed attempt too; its traceback follows
            _push_metrics(run, failed=True)
        raise
    finally:
        storage.STAGE_STARTED_AT.reset(clock)


def _push_metrics(run: StageRun, failed: bool) -> None:
    """Best effort: monitoring being down must not fail a pipeline step, nor hide why one failed."""
    if not run.settings.pushgateway_url:
        return
    from keel.monitor.push import push_stage_failure, push_stage_metrics

    try:
        if failed:
            push_stage_failure(run.settings.pushgateway_url, run.config.pipeline, run.stage)
        else:
            push_stage_metrics(run.settings.pushgateway_url, run.config.pipeline, run.stage,
                               storage.read_manifest(run.output_uri, run.settings))
    except (OSError, KeelError) as e:
        print(f"keel: warning: could not push metrics to {run.settings.pushgateway_url}: {e}", file=sys.stderr)


def registered_as(decision: dict[str, Any]) -> str:
    """What the summary line adds to a new version: champion, awaiting approval, or nothing."""
    return ", champion" if decision["promoted"] else ", awaiting approval" if decision.get("awaiting_approval") else ""


def promotion_lines(reason: str, checks: list[str]) -> list[str]:
    """The register step's reason split where it quotes the gate's checks: the verdict, each check, and what
    follows them (what a person does next, under manual approval)."""
    quoted = "; ".join(checks)
    head, found, tail = reason.partition(f": {quoted}") if checks else (reason, "", "")
    if not found:
        return [reason]
    return [head, *checks, *([tail.removeprefix(". ")] if tail else [])]


def find_stage_error(log_text: str) -> dict[str, str] | None:
    """The first stage error recorded in a run's log, if any."""
    for line in log_text.splitlines():
        _, marker, payload = line.partition(ERROR_MARKER)  # kfp.local indents step output
        if marker:
            return dict(json.loads(payload))
    return None


def stage_manifests(settings: KeelSettings, run_id: str) -> dict[str, dict[str, Any]]:
    """Published manifests of a run's stages, in pipeline order; absent stages are left out."""
    found = {}
    for stage in STAGE_ORDER:
        uri = storage.stage_uri(settings, run_id, stage)
        if storage.exists(storage.join(uri, storage.MANIFEST), settings):
            found[stage] = storage.read_manifest(uri, settings)
    return found
