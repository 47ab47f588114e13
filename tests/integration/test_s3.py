"""The s3:// path against a real S3 HTTP API on 127.0.0.1 (moto's server).

In a cluster the same code talks to MinIO; nothing here is moto-specific.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from keel import storage
from keel.data import tables
from keel.data.ingest import ingest
from keel.errors import ConfigError, DataError, StorageError
from keel.settings import load_settings
from tests.conftest import small_frame
from tests.integration.conftest import S3_SECRET, s3_client
from tests.processes import keel

pytestmark = pytest.mark.integration


def test_staged_output_roundtrip_on_s3(s3_env: dict[str, str]) -> None:
    settings = load_settings()
    target = storage.join(settings.artifact_root, "runs", "r1", "stage")
    with storage.staged_output(target, "stage", settings) as out:
        out.write_json("nested/result.json", {"ok": True})
    assert storage.read_json(storage.join(target, "nested/result.json"), settings) == {"ok": True}
    assert storage.list_children(storage.join(settings.artifact_root, "runs", "r1"), settings) == ["stage"]
    with pytest.raises(RuntimeError), storage.staged_output(storage.join(target, "..", "failed"), "x", settings) as o:
        o.write_json("half.json", {})
        raise RuntimeError("died")
    assert storage.list_children(storage.join(settings.artifact_root, "runs", "r1"), settings) == ["stage"]


def test_a_destination_prefix_is_replaced_only_when_it_holds_nothing_but_an_earlier_output(
        s3_env: dict[str, str]) -> None:
    """`keel predict ... s3://bucket/data` emptied the prefix first: every object under it was deleted."""
    from keel.cli.output import refuse_to_replace

    settings, client, bucket = load_settings(), s3_client(s3_env["KEEL_S3_ENDPOINT"]), s3_env["bucket"]
    client.put_object(bucket, "data/customers.csv", io.BytesIO(b"id\n1\n"), 5)
    for destination in (f"s3://{bucket}/data", f"s3://{bucket}"):
        with pytest.raises(ConfigError, match="holds files that are not an earlier Keel output"):
            refuse_to_replace(destination, True, settings)
    output = f"s3://{bucket}/scores"
    with storage.staged_output(output, "predict", settings) as out:
        out.write_json("predictions/part-0.json", {})
    assert storage.read_manifest(output, settings)[storage.WRITTEN] == ["predictions"]
    refuse_to_replace(output, True, settings)
    client.put_object(bucket, "scores/mine.txt", io.BytesIO(b"x"), 1)
    with pytest.raises(ConfigError, match="holds mine.txt, which its earlier output did not write"):
        refuse_to_replace(output, True, settings)
    assert storage.read_bytes(f"s3://{bucket}/data/customers.csv", settings) == b"id\n1\n"


def test_ingest_reads_an_s3_source(s3_env: dict[str, str], tmp_path: Path) -> None:
    settings = load_settings()
    frame = small_frame(40)
    source = f"s3://{s3_env['bucket']}/incoming/data.parquet"
    frame.to_parquet(tmp_path / "data.parquet", index=False)
    storage.write_bytes(source, (tmp_path / "data.parquet").read_bytes(), settings)
    output = storage.stage_uri(settings, "r1", "ingest")
    assert ingest(source, output, settings)["rows"] == 40
    stored = storage.read_parquet(storage.join(output, "data.parquet"), settings)
    pd.testing.assert_frame_equal(stored, frame)


def test_an_s3_prefix_of_parquet_parts_is_read_as_one_table(s3_env: dict[str, str], tmp_path: Path) -> None:
    """As Spark or Ray Data leave a table on S3: parts under Hive partitions, a _SUCCESS marker beside them.
    Training ingests it, and the recommender's and intents' readers (tables.read_table) read it the same."""
    from tests.unit.data.test_ingest import _parts

    settings = load_settings()
    frame = small_frame(60)
    local = _parts(tmp_path / "table", frame)
    prefix = f"s3://{s3_env['bucket']}/lake/table"
    for part in (p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(f"{prefix}/{part.relative_to(local)}", part.read_bytes(), settings)
    output = storage.stage_uri(settings, "r1", "ingest")
    manifest = ingest(prefix + "/", output, settings)
    assert manifest["rows"] == 60
    assert manifest["sha256"] == ingest(str(local), storage.stage_uri(settings, "r2", "ingest"), settings)["sha256"]
    read = tables.read_table(prefix, settings, "interactions")  # no trailing slash: a key without an extension
    assert len(read) == 60 and sorted(read["size"]) == sorted(frame["size"])
    with pytest.raises(DataError, match=r"s3://.*/lake/nothing: no Parquet part files there \(empty\)"):
        tables.read_table(f"s3://{s3_env['bucket']}/lake/nothing", settings, "interactions")
    storage.write_bytes(f"{prefix}-export", b"a,b\n1,2\n", settings)  # a file someone saved without a suffix
    with pytest.raises(DataError, match=r"lake/table-export: an object without a file extension"):
        ingest(f"{prefix}-export", output, settings)


def test_missing_s3_object_is_named(s3_env: dict[str, str]) -> None:
    with pytest.raises(StorageError, match=r"s3://.*/nope.csv: cannot download the object"):
        ingest(f"s3://{s3_env['bucket']}/nope.csv", storage.stage_uri(load_settings(), "r", "ingest"), load_settings())


@pytest.mark.slow
def test_pipeline_with_artifacts_and_mlflow_models_on_s3(s3_env: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in s3_env.items() if k.startswith("KEEL_")}
    env["KEEL_HOME"] = str(tmp_path / ".keel")
    smaller = tmp_path / "smaller.yaml"  # every stage on S3, with a two-trial search and one compressed variant
    smaller.write_text("tune: {num_samples: 2}\ncompress: {methods: [int8]}\n")
    result = keel("run", "medical_diagnosis", "--config", str(smaller), "--output", "json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["artifacts"].startswith(f"s3://{s3_env['bucket']}/keel/runs/")
    logs = result.stdout + result.stderr + "".join(p.read_text() for p in (tmp_path / ".keel" / "logs").glob("*.log"))
    assert len(logs) > 1000 and S3_SECRET not in logs  # every step's log, and the secret in none
    assert not (tmp_path / ".keel" / "artifacts").exists()  # nothing went to local disk instead
    settings = load_settings()
    children = storage.list_children(report["artifacts"], settings)
    assert {"ingest", "validate", "preprocess", "tune", "train", "compress", "evaluate", "register",
            "checkpoints"} <= set(children)
    for name, value in settings.s3_environment().items():  # what a user exports to read the model
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(report["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/medical-diagnosis@champion")  # downloaded from S3
    raw = storage.read_parquet(storage.join(report["artifacts"], "preprocess", "test_raw.parquet"), settings)
    predicted = model.predict(raw.drop(columns=["diagnosis"]))
    assert (predicted["prediction"] == raw["diagnosis"]).mean() >= 0.9

    # batch inference from S3 to S3, with the same credentials
    source = f"s3://{s3_env['bucket']}/incoming/to_score.parquet"
    storage.write_bytes(source, raw.to_parquet(index=False), settings)
    destination = f"s3://{s3_env['bucket']}/scored/today"
    scored_run = keel("predict", "models:/medical-diagnosis@champion", source, destination, "--keep", "diagnosis",
                      cwd=tmp_path, env=env)
    assert scored_run.returncode == 0, scored_run.stderr[-3000:]
    scored = storage.read_parquet(storage.join(destination, "predictions.parquet"), settings)
    assert list(scored["prediction"]) == list(predicted["prediction"])
    assert storage.read_manifest(destination, settings)["rows"] == len(raw)

    # a check on labeled rows from S3 to S3: the test split itself scores exactly what the version registered
    checked_at = f"s3://{s3_env['bucket']}/checked/today"
    checked_run = keel("evaluate", "models:/medical-diagnosis@champion", source, checked_at, "--output", "json",
                       cwd=tmp_path, env=env)
    assert checked_run.returncode == 0, checked_run.stderr[-3000:]
    checked = json.loads(checked_run.stdout)
    assert checked["verdict"] == "ok" and checked["rows"] == len(raw) and checked["unlabeled_rows"] == 0
    assert checked["metrics"] == pytest.approx(checked["registered"])
    assert {"manifest.json", "performance.json", "report.html"} <= set(storage.list_children(checked_at, settings))
    check = mlflow.MlflowClient(report["tracking_uri"]).get_run(checked["mlflow_run_id"])
    assert check.info.artifact_uri.startswith(f"s3://{s3_env['bucket']}/keel/")
    assert [d.dataset.source for d in check.inputs.dataset_inputs] == [json.dumps({"uri": source})]

    # the ray engine over an S3 prefix of parts: its actors write the parts straight to S3, manifest last
    parts = f"s3://{s3_env['bucket']}/incoming/parts"
    half = len(raw) // 2
    for number, part in enumerate([raw.iloc[:half], raw.iloc[half:]]):
        storage.write_bytes(f"{parts}/part-{number}.parquet", part.to_parquet(index=False), settings)
    on_ray = keel("predict", "models:/medical-diagnosis@champion", parts, destination, "--keep", "diagnosis",
                  "--ray", "--workers", "2", "--force", cwd=tmp_path, env=env)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    filesystem, path = storage.pyarrow_filesystem(storage.join(destination, "predictions"), settings)
    on_ray = pd.read_parquet(path, filesystem=filesystem)  # in no promised order: compared as multisets
    assert sorted(zip(on_ray["diagnosis"], on_ray["prediction"])) == sorted(zip(raw["diagnosis"],
                                                                                predicted["prediction"]))
    assert storage.list_children(destination, settings) == ["manifest.json", "predictions"]  # the old file went
    assert storage.read_manifest(destination, settings)["engine"] == "ray"

    # a part the model cannot score: the earlier output is gone and nothing of this one is left
    as_text = raw.astype({"mean_radius": str})  # in every part, so that the parts agree on its type
    as_text.loc[as_text.index[half + 3], "mean_radius"] = "n/a"
    for number, part in enumerate([as_text.iloc[:half], as_text.iloc[half:]]):
        storage.write_bytes(f"{parts}/part-{number}.parquet", part.to_parquet(index=False), settings)
    refused = keel("predict", "models:/medical-diagnosis@champion", parts, destination, "--keep", "diagnosis",
                   "--ray", "--force", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "the row with diagnosis=" in refused.stderr, refused.stderr[-3000:]
    assert "column 'mean_radius'" in refused.stderr and storage.list_children(destination, settings) == []


# The other two pipelines' steps read and write through the same storage layer, but each has its own readers:
# Ray Data over the splits, checkpoints, the tokenizer and encoder directories, the ids beside the splits.
OTHER_PIPELINES = {
    "ecommerce_recommendations": ("interactions: {users: 600, items: 300}\ntrain: {max_epochs: 3}\n"
                                  "evaluate: {min_lift_over_popular: 0}\n",
                                  "ecommerce-recommendations", {"ingest", "train", "evaluate", "register"}),
    "customer_service_intents": ("utterances: {per_intent: 24}\ntrain: {max_epochs: 1}\n"
                                 "compress: {distill_epochs: 1, latency_repeats: 3}\n"
                                 "evaluate: {min_gain_over_baseline: -1.0}\n",
                                 "customer-service-intents", {"ingest", "train", "evaluate", "register"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", sorted(OTHER_PIPELINES))
def test_the_recommender_and_intent_pipelines_run_on_s3(pipeline: str, s3_env: dict[str, str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config, model_name, stages = OTHER_PIPELINES[pipeline]
    env = {k: v for k, v in s3_env.items() if k.startswith("KEEL_")}
    env["KEEL_HOME"] = str(tmp_path / ".keel")
    (tmp_path / "smaller.yaml").write_text(config)
    result = keel("run", pipeline, "--config", "smaller.yaml", "--output", "json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["artifacts"].startswith(f"s3://{s3_env['bucket']}/keel/runs/")
    assert not (tmp_path / ".keel" / "artifacts").exists()
    settings = load_settings()
    assert stages | {"checkpoints"} <= set(storage.list_children(report["artifacts"], settings))
    for name, value in settings.s3_environment().items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(report["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/1")  # downloaded from S3
    if pipeline == "ecommerce_recommendations":
        answer = model.predict(pd.DataFrame({"user_id": [0, 10**9]}), params={"k": 5}).to_dict(orient="records")
        assert [a["source"] for a in answer] == ["personalized", "popular"] and len(answer[0]["items"]) == 5
    else:
        from keel.intents.data import INTENTS

        answer = model.predict(pd.DataFrame({"text": ["I want my money back", "where is my parcel"]}))
        assert set(answer["intent"]) <= set(INTENTS) and answer["probability"].between(0, 1).all()
