"""Where a registered version came from and what was decided about it; two versions side by side.

`keel models show` and `keel models compare` read this. A person deciding on a version awaiting approval, or
on a rollback, asks the same questions of both sides: which pipeline run and commit, which data (by digest),
what the gate said, what the test metrics are, and which settings differ.
"""

from __future__ import annotations

import json
from typing import Any

from keel import tracking
from keel.errors import RegistryError
from keel.registry import DECISION_TAGS, registered_version
from keel.settings import KeelSettings


def version_lineage(name: str, version: str, settings: KeelSettings) -> dict[str, Any]:
    """Where one version came from and what was decided about it, in one place: its pipeline run and commit,
    the data it was trained on, the columns it reads and classes it predicts (None where its signature does
    not say), its test metrics, which compressed variant it is and why, the gate's decision, a person's
    decisions, the latest check on labels, and the config it was trained with."""
    client = tracking.mlflow_client(settings)
    found = registered_version(client, name, version, settings)
    aliases = sorted(alias for alias, v in (client.get_registered_model(name).aliases or {}).items()
                     if str(v) == str(found.version))
    run = client.get_run(found.run_id) if found.run_id else None
    tags = run.data.tags if run else {}
    return {
        "model_uri": f"models:/{name}/{found.version}", "name": name, "version": str(found.version),
        "aliases": aliases, "status": found.status, "created_ms": found.creation_timestamp,
        "logged_model_id": tracking.version_logged_model_id(found, run), "run_id": found.run_id,
        "run_url": tracking.mlflow_run_url(settings.mlflow_tracking_uri, run.info.experiment_id if run else None,
                                           found.run_id),
        "pipeline": tags.get(tracking.PIPELINE_TAG), "pipeline_run": tags.get(tracking.PIPELINE_RUN_TAG),
        "git_commit": tags.get(tracking.GIT_COMMIT_TAG),
        **dict(zip(("inputs", "classes"), tracking.served_schema(f"models:/{name}/{found.version}"))),
        "datasets": [_dataset(d) for d in (run.inputs.dataset_inputs if run and run.inputs else [])],
        "test_metrics": {k: v for k, v in sorted((run.data.metrics if run else {}).items()) if k.startswith("test_")},
        "variant": tags.get(tracking.COMPRESSION_CHOSEN_TAG),
        "variant_reason": tags.get(tracking.COMPRESSION_REASON_TAG),
        "gate": tags.get(tracking.GATE_TAG), "promotion_reason": tags.get(tracking.PROMOTION_REASON_TAG),
        "promotion_checks": _json_list(tags.get(tracking.PROMOTION_CHECKS_TAG)),
        "decisions": {key: found.tags[key] for key in DECISION_TAGS if found.tags.get(key)},
        "params": dict(sorted((run.data.params if run else {}).items())),
    }


def _dataset(linked: Any) -> dict[str, Any]:
    """A run's dataset input, with the run's own copy as its source where the register step tagged it
    (MLflow's own source is the first copy of these bytes any run logged)."""
    own = {tag.key: tag.value for tag in linked.tags or []}.get(tracking.DATASET_URI_TAG)
    dataset = linked.dataset
    return {"name": dataset.name, "digest": dataset.digest,
            "source": own or json.loads(dataset.source or "{}").get("uri", dataset.source)}


def _json_list(text: str | None) -> list[str]:
    """A tag holding a JSON list; empty when absent (a version registered before Keel kept it) or cut short."""
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError:
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def compare_versions(name: str, first: str, second: str, settings: KeelSettings) -> dict[str, Any]:
    """Two versions' lineage side by side: every test metric of either with the change from ``first`` to
    ``second``, how the input columns and classes change from one to the other (what callers send and read),
    and the config params that differ (a param one run lacks shows as None)."""
    left, right = (version_lineage(name, version, settings) for version in (first, second))
    if left["version"] == right["version"]:
        raise RegistryError(f"{first} and {second} are both models:/{name}/{left['version']}: nothing to compare. "
                            f"Name the other version: `keel models compare {name} N {left['version']}`.")
    metrics = [{"metric": metric, "first": left["test_metrics"].get(metric), "second": right["test_metrics"].get(metric),
                "change": _change(left["test_metrics"].get(metric), right["test_metrics"].get(metric))}
               for metric in sorted(left["test_metrics"].keys() | right["test_metrics"].keys())]
    differ = [{"param": param, "first": left["params"].get(param), "second": right["params"].get(param)}
              for param in sorted(left["params"].keys() | right["params"].keys())
              if left["params"].get(param) != right["params"].get(param)]
    same = sum(1 for param in left["params"].keys() & right["params"].keys()
               if left["params"][param] == right["params"][param])
    return {"name": name, "first": _without_params(left), "second": _without_params(right), "metrics": metrics,
            "inputs_change": tracking.column_changes(left["inputs"], right["inputs"]),
            "classes_change": tracking.column_changes(left["classes"], right["classes"]),
            "params_differ": differ, "params_same": same}


def _change(first: float | None, second: float | None) -> float | None:
    return None if first is None or second is None else second - first


def _without_params(lineage: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in lineage.items() if key not in ("params", "test_metrics")}
