"""Batch scoring (`keel predict`) with a real registered model and real files: what the server would answer,
for every row, or nothing at all."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from keel import storage
from keel.batch import PREDICTIONS_FILE, PredictConfig, score_loaded, score_table
from keel.errors import DataError
from keel.predictor import Predictor
from keel.registry import register
from keel.serve.deployment import LoadedModel
from keel.settings import KeelSettings
from tests.conftest import small_frame
from tests.stages import TEXT_IDS, packaged_recommender, run_stages, small_config, write_small_source
from tests.processes import keel

MODEL_URI = "models:/small-model@champion"


@pytest.fixture
def registered(settings: KeelSettings, tmp_path: Path) -> str:
    uris = run_stages(settings, "batch", write_small_source(tmp_path))
    config = small_config()
    register(uris["train"], uris["evaluate"], uris["ingest"], uris["preprocess"], config.registry, {}, "batch",
             "small", storage.stage_uri(settings, "batch", "register"), settings)
    return uris["train"]


def rows_to_score(count: int = 250) -> pd.DataFrame:
    frame = small_frame(count, seed=7).drop(columns=["outcome"])
    frame.insert(0, "customer", [f"c-{i}" for i in range(count)])
    return frame


def test_every_row_scores_as_the_model_scores_it_with_the_kept_columns_beside(
        registered: str, settings: KeelSettings, tmp_path: Path) -> None:
    source = tmp_path / "to_score.parquet"
    rows = rows_to_score()
    rows.to_parquet(source, index=False)
    manifest = score_table(MODEL_URI, str(source), str(tmp_path / "out"), settings,
                           PredictConfig(keep=["customer"], batch_rows=64))  # four batches, the last one short
    scored = pd.read_parquet(tmp_path / "out" / PREDICTIONS_FILE)
    expected = Predictor.load(Path(registered)).predict(rows)
    assert list(scored["customer"]) == list(rows["customer"])
    pd.testing.assert_frame_equal(scored.drop(columns=["customer"]), expected, check_dtype=False, atol=1e-6)
    assert manifest["model_uri"] == "models:/small-model/1" and manifest["rows"] == 250
    assert manifest["columns"] == ["customer", *expected.columns] and manifest["kept_columns"] == 1


def test_a_bad_value_in_the_last_batch_leaves_nothing_and_names_its_row(registered: str, settings: KeelSettings,
                                                                          tmp_path: Path) -> None:
    rows = rows_to_score().astype({"size": object})
    rows.loc[[199, 230], "size"] = "twelve"  # the last batch holds rows 193-250
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv, data row 200 \(of rows 193-250 in this batch\): column 'size': "
                                        r"2 value\(s\) are not numbers"):
        score_table(MODEL_URI, str(tmp_path / "bad.csv"), str(tmp_path / "out"), settings, PredictConfig(batch_rows=64))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.predict-*"))


@pytest.mark.parametrize("change, keep, message", [
    (lambda f: f.drop(columns=["weight"]), None, r"the model reads column\(s\) \['weight'\], which the file does not"),
    (lambda f: f.rename(columns={"weight": "Weight "}), None,
     r"the model reads column\(s\) \['weight'\], .*\. Near names in the file: 'Weight ' for 'weight'\.$"),
    (lambda f: f, ["customer", "id"], r"predict.keep\) names column\(s\) \['id'\] that the file does not have"),
    (lambda f: f.assign(prediction="x"), None, r"column\(s\) \['prediction'\] would be overwritten"),
    (lambda f: f.head(0), None, "zero data rows"),
])
def test_a_table_the_model_cannot_score_is_refused_by_file_and_column(registered: str, settings: KeelSettings,
                                                                      tmp_path: Path, change, keep, message) -> None:
    change(rows_to_score()).to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(DataError, match=message):
        score_table(MODEL_URI, str(tmp_path / "rows.csv"), str(tmp_path / "out"), settings, PredictConfig(keep=keep))
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_to_replace_an_output_without_force(registered: str, tmp_path: Path) -> None:
    rows_to_score(20).to_csv(tmp_path / "rows.csv", index=False)
    first = keel("predict", MODEL_URI, "rows.csv", "out", "--keep", "customer", "--output", "json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["rows"] == 20
    again = keel("predict", MODEL_URI, "rows.csv", "out", cwd=tmp_path)
    assert again.returncode == 1 and "holds an earlier output; pass --force" in again.stderr
    forced = keel("predict", MODEL_URI, "rows.csv", "out", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "Scored 20 rows" in forced.stdout
    assert "4 input column(s) kept, then prediction, probability_no, probability_yes" in forced.stdout
    alone = keel("predict", MODEL_URI, "rows.csv", "out", "--force", "--workers", "4", cwd=tmp_path)
    assert alone.returncode == 1 and "--workers sizes the --ray engine's actor pool" in alone.stderr


def test_a_recommender_answers_each_user_with_typed_lists_even_when_a_batch_knows_nobody(
        settings: KeelSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recommender = packaged_recommender(tmp_path / "model", TEXT_IDS)
    loaded = LoadedModel(None, "recs", "3", recommender)
    pd.DataFrame({"user_id": ["stranger", "A1XK", "B07", "nobody"]}).to_csv(tmp_path / "users.csv", index=False)
    score_loaded(loaded, str(tmp_path / "users.csv"), str(tmp_path / "out"), settings, PredictConfig(batch_rows=1, k=2))
    scored = pd.read_parquet(tmp_path / "out" / PREDICTIONS_FILE)  # the first batch is an unknown user alone
    assert list(scored.columns) == ["user_id", "items", "scores", "known_user", "source"]
    assert list(scored["source"]) == ["popular", "personalized", "personalized", "popular"]
    assert [list(items) for items in scored["items"]] == [r["items"] for r in recommender.recommend(
        ["stranger", "A1XK", "B07", "nobody"], 2)]
    assert scored["scores"].map(len).tolist() == [0, 2, 2, 0]

    # the file names its user column as the training data did (MovieLens' userId): the same answers
    pd.read_csv(tmp_path / "users.csv").rename(columns={"user_id": "userId"}).to_csv(tmp_path / "ml.csv", index=False)
    score_loaded(loaded, str(tmp_path / "ml.csv"), str(tmp_path / "ml"), settings,
                 PredictConfig(k=2, input_column="userId"))
    renamed = pd.read_parquet(tmp_path / "ml" / PREDICTIONS_FILE)
    pd.testing.assert_frame_equal(renamed.rename(columns={"userId": "user_id"}), scored)
    with pytest.raises(DataError, match=r"reads column\(s\) \['user_id'\], which the file does not have"):
        score_loaded(loaded, str(tmp_path / "ml.csv"), str(tmp_path / "none"), settings)

    # one batch of all four, ranked three users at a time (the score matrix stays bounded): the same answers
    monkeypatch.setattr("keel.batch.scorers.USERS_PER_RANKING", 3)
    score_loaded(loaded, str(tmp_path / "users.csv"), str(tmp_path / "again"), settings, PredictConfig(batch_rows=4, k=2))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again" / PREDICTIONS_FILE), scored)


def test_the_pipeline_step_reads_only_a_batch_scoring_config(registered: str, settings: KeelSettings,
                                                             tmp_path: Path) -> None:
    from keel.batch import score_with_config
    from keel.config import load_pipeline_config
    from keel.errors import ConfigError
    from pipelines.batch_scoring.pipeline import CONFIG_FILE
    from pipelines.medical_diagnosis.pipeline import CONFIG_FILE as TRAINING_CONFIG

    with pytest.raises(ConfigError, match="reads its training columns by name; input_column is for"):
        score_table(MODEL_URI, "rows.csv", str(tmp_path / "out"), settings, PredictConfig(input_column="text"))
    training = load_pipeline_config(TRAINING_CONFIG)
    with pytest.raises(ConfigError, match="reads a batch_scoring config, not 'medical_diagnosis'"):
        score_with_config(MODEL_URI, "rows.csv", str(tmp_path / "out"), training, settings)
    (tmp_path / "bad.yaml").write_text("predict: {batch_rows: 0}\n")
    with pytest.raises(ConfigError, match="predict.batch_rows"):
        load_pipeline_config(CONFIG_FILE, tmp_path / "bad.yaml")


@pytest.mark.parametrize("source", ["rows.csv", "s3://bucket/rows.jsonl", "https://example.com/rows.parquet"])
def test_the_ray_engine_refuses_what_ray_data_would_not_read_as_the_local_engine_does(
        settings: KeelSettings, tmp_path: Path, source: str) -> None:
    # before a model is loaded or Ray started: the local engine's CSV checks and http(s) reader are its own
    with pytest.raises(DataError, match=r"the ray engine reads Parquet: a file, or a directory or s3:// prefix.*"
                                        r"score it with the local engine"):
        score_table("models:/not-registered@champion", source, str(tmp_path / "out"), settings,
                    PredictConfig(engine="ray"))
    assert not (tmp_path / "out").exists()


def test_the_ray_engine_refuses_to_keep_no_column_to_join_its_unordered_rows_on(settings: KeelSettings,
                                                                               tmp_path: Path) -> None:
    from keel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"in no fixed order.*keep \(--keep, predict.keep\) at least an id"):
        score_table(MODEL_URI, "rows.parquet", str(tmp_path / "out"), settings, PredictConfig(keep=[], engine="ray"))
