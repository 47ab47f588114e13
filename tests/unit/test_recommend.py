"""The recommendation stages without Ray: generator, split, metrics, BPR steps, the top-k answer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from keel.config import parse_pipeline_config
from keel.errors import ConfigError, DataError
from keel.recommend.config import (InteractionColumns, InteractionsConfig, RecommendPipelineConfig,
                                   RecommendTrainConfig, SplitConfig)
from keel.recommend.data import check_interactions, generate_interactions, number_ids, prepare, split_latest
from keel.recommend.metrics import popularity_scorer, ranking_metrics, seen_items, top_k
from keel.recommend.model import (FactorizationSpec, MatrixFactorization, SeenPairs, bpr_optimizer,
                                  sample_negatives, sparse_gradients)
from keel.recommend.recommender import Recommender, rows_of
from keel.recommend.train import (bpr_epoch, one_worker_unless_asked, seen_pairs, validation_ndcg,
                                  validation_sample)
from keel.settings import KeelSettings
from tests.stages import INTEGER_IDS, TEXT_IDS, packaged_recommender

SMALL = InteractionsConfig(users=400, items=150, mean_interactions=20, seed=7)


@pytest.fixture(scope="module")
def small_splits() -> dict[str, pd.DataFrame]:
    return split_latest(generate_interactions(SMALL), SplitConfig())


def test_the_default_generator_is_seeded_and_as_large_as_the_pipeline_needs() -> None:
    config = InteractionsConfig()
    frame = generate_interactions(config)
    assert frame["user_id"].nunique() == config.users >= 5000 and frame["item_id"].nunique() >= 0.95 * config.items
    assert set(frame["event"]) == {"view", "cart", "purchase"}
    assert generate_interactions(SMALL).equals(generate_interactions(SMALL))
    counts = frame["item_id"].value_counts()
    assert counts.head(len(counts) // 100).sum() > 0.05 * len(frame)  # popularity skew: the top 1% of items


def test_each_users_latest_interactions_are_held_out(small_splits: dict[str, pd.DataFrame]) -> None:
    train, val, test = small_splits["train"], small_splits["val"], small_splits["test"]
    assert test.groupby("user_id").size().eq(2).all() and val.groupby("user_id").size().eq(1).all()
    latest_train = train.groupby("user_id")["timestamp"].max()
    assert (val.set_index("user_id")["timestamp"] >= latest_train.reindex(val["user_id"]).to_numpy()).all()
    assert (test.groupby("user_id")["timestamp"].min() >= val.set_index("user_id")["timestamp"]).all()
    assert len(train) + len(val) + len(test) == len(generate_interactions(SMALL))


def test_users_with_too_few_interactions_stay_in_train() -> None:
    frame = pd.DataFrame({"user_id": [0, 0, 1, 1, 1, 1, 1, 1], "item_id": [1, 2, 1, 2, 3, 4, 5, 6],
                          "event": "view", "timestamp": range(8)})
    splits = split_latest(frame, SplitConfig(holdout_per_user=2, min_train_interactions=3))
    assert set(splits["test"]["user_id"]) == {1} and (splits["train"]["user_id"] == 0).sum() == 2
    assert splits["test"]["item_id"].tolist() == [5, 6]


@pytest.mark.parametrize("change, message", [
    ({"drop": "item_id"}, r"missing column\(s\) \['item_id'\]"),
    ({"user_id": [-1, 2]}, "column 'user_id': 1 value"),
    ({"timestamp": ["soon", 3]}, "column 'timestamp': 1 value.*integers or ISO 8601 date-times"),
    ({"timestamp": ["2024-05-01T10:00:00Z", "soon"]}, "column 'timestamp': 1 value"),
    ({"user_id": [10**9, -2]}, "column 'user_id': 1 value"),
    ({"event": ["view", "wishlist"]}, r"column 'event': unknown value\(s\) \['wishlist'\]"),
])
def test_bad_interaction_files_are_rejected_by_column(change: dict, message: str) -> None:
    frame = pd.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "event": ["view", "cart"], "timestamp": [5, 6]})
    if "drop" in change:
        frame = frame.drop(columns=[change["drop"]])
    else:
        frame = frame.assign(**change)
    with pytest.raises(DataError, match=message):
        check_interactions(frame, "clicks.csv")


def test_timestamps_may_be_date_times_and_only_their_order_matters() -> None:
    """Exports write ISO 8601 text (with or without a zone) or a Parquet timestamp: both become epoch seconds."""
    frame = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [3, 4, 5], "event": "view",
                          "timestamp": ["2024-05-01T10:00:00Z", "2024-05-01 09:00:00", "2024-05-01T12:30:00+02:00"]})
    assert check_interactions(frame, "clicks.csv")["timestamp"].tolist() == [1714557600, 1714554000, 1714559400]
    typed = frame.assign(timestamp=pd.to_datetime(["2024-05-01T10:00:00", "2024-05-01T09:00:00", "2024-05-01"],
                                                  format="ISO8601"))
    assert check_interactions(typed, "clicks.parquet")["timestamp"].tolist() == [1714557600, 1714554000, 1714521600]


def test_recall_and_ndcg_match_a_hand_computed_ranking() -> None:
    held_out = pd.DataFrame({"user_id": [0, 0, 1], "item_id": [3, 4, 0]})
    scores = np.array([[0.0, 9.0, 5.0, 8.0, 1.0],   # user 0 ranks 1 (seen, masked), 3, 2, 4, 0
                       [1.0, 0.0, 0.0, 0.0, 0.0]])  # user 1 ranks 0 first
    metrics = ranking_metrics(lambda users: scores[users], held_out, {0: np.array([1])}, k=3, items=5)
    # user 0: top 3 = [3, 2, 4]: both relevant items found; DCG 1 + 1/log2(4), ideal 1 + 1/log2(3)
    user0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert metrics["recall_at_3"] == pytest.approx((1.0 + 1.0) / 2)
    assert metrics["ndcg_at_3"] == pytest.approx((user0 + 1.0) / 2)
    assert top_k(np.array([[1.0, 3.0, 2.0]]), 2).tolist() == [[1, 2]]


def _metrics_user_by_user(scores: np.ndarray, held_out: pd.DataFrame, seen: dict[int, np.ndarray],
                          k: int) -> dict[str, float]:
    """The definition, one user at a time: what the batched ranking_metrics must agree with."""
    recalls, ndcgs = [], []
    for user, group in held_out.groupby("user_id"):
        truth, row = set(group["item_id"].tolist()), scores[user].copy()
        row[seen.get(int(user), [])] = -np.inf
        ranked = [item for item in np.argsort(-row, kind="stable") if np.isfinite(row[item])][:k]
        gains = [1 / math.log2(rank + 2) for rank, item in enumerate(ranked) if item in truth]
        recalls.append(len(gains) / len(truth))
        ndcgs.append(sum(gains) / sum(1 / math.log2(rank + 2) for rank in range(min(len(truth), k))))
    return {f"recall_at_{k}": float(np.mean(recalls)), f"ndcg_at_{k}": float(np.mean(ndcgs))}


@pytest.mark.parametrize("items", [7, 300])
def test_batched_ranking_metrics_agree_with_the_definition_user_by_user(items: int) -> None:
    """Across batches (1,200 users), with repeated held-out pairs, held-out items also seen, users with nothing
    seen, and users who have seen all but a few items (fewer than k left to rank when ``items`` is 7)."""
    rng = np.random.default_rng(items)
    users = 1_200
    scores = rng.permutation(users * items).reshape(users, items).astype(np.float32)  # no ties: one ranking
    held_out = pd.DataFrame({"user_id": rng.integers(0, users, 3_000), "item_id": rng.integers(0, items, 3_000)})
    seen = {user: rng.choice(items, size=rng.integers(0, items - 1), replace=False) for user in range(0, users, 2)}
    batched = ranking_metrics(lambda rows: scores[rows], held_out, seen, 5, items)
    expected = _metrics_user_by_user(scores, held_out, seen, 5)
    assert batched["users_evaluated"] == held_out["user_id"].nunique()
    assert batched["recall_at_5"] == pytest.approx(expected["recall_at_5"], rel=1e-12)
    assert batched["ndcg_at_5"] == pytest.approx(expected["ndcg_at_5"], rel=1e-12)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_bpr_training_beats_the_most_popular_list(small_splits: dict[str, pd.DataFrame], sparse: bool) -> None:
    train, val = small_splits["train"], small_splits["val"]
    spec = FactorizationSpec(users=SMALL.users, items=SMALL.items, embedding_dim=16)
    torch.manual_seed(0)
    model = MatrixFactorization(spec, sparse=sparse)
    optimizer = bpr_optimizer(model, 0.02, sparse)
    config = RecommendTrainConfig().model_dump()
    users, items = (torch.tensor(train[c].to_numpy()) for c in ("user_id", "item_id"))
    seen = seen_items(train)
    before = validation_ndcg(model, val, seen, 10)
    losses = [bpr_epoch(model, optimizer, users, items, seen_pairs(train, spec), config,
                        torch.Generator().manual_seed(epoch)) for epoch in range(15)]
    popular = train["item_id"].value_counts().rename_axis("item_id").reset_index(name="count")
    baseline = ranking_metrics(popularity_scorer(popular, SMALL.items), val, seen, 10, SMALL.items)["ndcg_at_10"]
    after = validation_ndcg(model, val, seen, 10)
    assert losses[-1] < 0.7 * losses[0] and after > before
    assert after > 1.3 * baseline, (after, baseline)


def test_early_stopping_is_judged_on_a_fixed_sample_of_validation_users(small_splits: dict[str, pd.DataFrame]) -> None:
    val = small_splits["val"]
    assert validation_sample(val, 10_000, seed=1) is val
    sample = validation_sample(val, 50, seed=1)
    assert sample["user_id"].nunique() == 50 and sample.equals(validation_sample(val, 50, seed=1))
    assert sample.equals(val[val["user_id"].isin(sample["user_id"])])  # each kept user's rows, all of them
    assert not sample.equals(validation_sample(val, 50, seed=2))


def _packaged(tmp_path: Path, ids: dict[str, list] = INTEGER_IDS) -> Recommender:
    return packaged_recommender(tmp_path, ids)


def test_known_users_get_unseen_items_and_unknown_users_the_popular_list(tmp_path: Path) -> None:
    recommender = _packaged(tmp_path)
    known, untrained, stranger, beyond_int64 = recommender.recommend([10, 30, 99, 10**30], k=3)
    assert known["known_user"] and known["source"] == "personalized" and len(known["items"]) == 3
    assert set(known["items"]) <= set(range(102, 106))  # the caller's item ids, none the user had
    assert stranger == untrained | {"user_id": 99} == beyond_int64 | {"user_id": 99}
    assert stranger["items"] == [102, 104, 101] and stranger["source"] == "popular" and not stranger["known_user"]
    with pytest.raises(ValueError, match="k must be between 1 and 100"):
        recommender.recommend([10], k=0)


def test_a_champion_scores_a_later_runs_rows_through_the_ids(tmp_path: Path) -> None:
    """The later run numbered users and items its own way, met a new user (40) and a new item (999): the
    champion's scores land in that run's columns, popular order for the stranger, nothing for the new item."""
    recommender = _packaged(tmp_path)
    scores = recommender.scorer(np.array([20, 10, 40]), np.array([101, 100, 999]))(np.array([0, 1, 2]))
    own = recommender.model.score_all(torch.tensor([1, 0])).numpy()
    np.testing.assert_allclose(scores[:2, :2], own[:, [1, 0]], rtol=1e-6)
    assert np.isneginf(scores[:, 2]).all() and scores[2, 0] == -2 and np.isneginf(scores[2, 1])


def test_text_ids_are_asked_and_answered_in_text(tmp_path: Path) -> None:
    """SKUs and account names as the ids: the same rows, the same ranking, the caller's strings back."""
    by_number, by_text = _packaged(tmp_path / "n"), _packaged(tmp_path / "t", TEXT_IDS)
    assert (by_text.user_id_type, by_text.item_id_type, by_number.user_id_type) == (str, str, int)
    numbered, texted = by_number.recommend([10, 99], k=3), by_text.recommend(["A1XK", "nobody"], k=3)
    to_text = dict(zip(INTEGER_IDS["item_id"], TEXT_IDS["item_id"]))
    assert texted[0]["items"] == [to_text[item] for item in numbered[0]["items"]]
    assert texted[0]["scores"] == numbered[0]["scores"] and texted[0]["source"] == "personalized"
    assert texted[1] == {"user_id": "nobody", "items": ["B0003", "SKU-5", "B0002"], "scores": [], "known_user": False,
                         "source": "popular"}


def test_ids_of_one_kind_are_looked_up_as_the_other() -> None:
    """A champion with integer ids rescoring a run with text ids (or a request's ids) reads them as its kind."""
    integers, texts = np.array([5, 42, 7_000_000_000]), np.array(["42", "SKU-1", "b"], dtype=object)
    assert rows_of(integers, ["42", "7000000000", "SKU-1", "-5", 10**30, -5, 5]).tolist() == [1, 2, -1, -1, -1, -1, 0]
    assert rows_of(texts, [42, "SKU-1", "sku-1", "c"]).tolist() == [0, 1, -1, -1]
    assert rows_of(np.array([], dtype=np.int64), [1, "a"]).tolist() == [-1, -1]


def test_seen_pairs_answer_like_a_dense_mask_and_redraw_seen_negatives() -> None:
    generator = torch.Generator().manual_seed(3)
    users, items = torch.randint(300, (5_000,), generator=generator), torch.randint(70, (5_000,), generator=generator)
    dense = torch.zeros((300, 70), dtype=torch.bool)
    dense[users, items] = True
    seen = SeenPairs(users, items, 70)
    every_user, every_item = (grid.flatten() for grid in torch.meshgrid(torch.arange(300), torch.arange(70),
                                                                         indexing="ij"))
    assert torch.equal(seen.contains(every_user, every_item), dense[every_user, every_item])
    assert not SeenPairs(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 70).contains(
        every_user, every_item).any()
    one_user = torch.zeros(20_000, dtype=torch.long)  # user 0 saw items 0..68: a draw of one is redrawn once
    narrow = SeenPairs(one_user[:69], torch.arange(69), 70)
    clashes = narrow.contains(one_user, sample_negatives(one_user, narrow, generator)).float().mean()
    assert 0.9 < clashes < 1.0  # 69/70 clash, then 69/70 of those again: 0.97; without the redraw 0.986


def test_a_sparse_catalogue_past_a_dense_masks_size_is_prepared_and_trained(tmp_path: Path) -> None:
    """40,000 users x 197,000 items: 7 GiB as a users x items mask of bytes, which the data step used to refuse."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40_000), 8)
    frame = pd.DataFrame({"user_id": users, "item_id": rng.integers(0, 300_000, len(users)) + 10**9,
                          "timestamp": np.tile(np.arange(8), 40_000)})
    frame.to_parquet(tmp_path / "clicks.parquet", index=False)
    settings = KeelSettings(home=tmp_path / ".keel")
    manifest = prepare(str(tmp_path / "clicks.parquet"), InteractionsConfig(), SplitConfig(), str(tmp_path / "out"),
                       settings)
    assert manifest["users"] * manifest["items"] > 7 << 30 and manifest["split_rows"]["test"] == 80_000
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    spec = FactorizationSpec(users=manifest["users"], items=manifest["items"], embedding_dim=8)
    assert sparse_gradients(spec, "auto") and not sparse_gradients(FactorizationSpec(users=5000, items=2000,
                                                                                      embedding_dim=8), "auto")
    model = MatrixFactorization(spec, sparse=True)
    optimizer = bpr_optimizer(model, 0.05, sparse=True)
    users, items = (torch.tensor(train[c].to_numpy()) for c in ("user_id", "item_id"))
    config = {"batch_size": 4096, "weight_decay": 0.0}
    losses = [bpr_epoch(model, optimizer, users, items, seen_pairs(train, spec), config,
                        torch.Generator().manual_seed(epoch)) for epoch in range(2)]
    assert model.user.weight.grad is not None and model.user.weight.grad.is_sparse
    assert losses[1] < losses[0]


def test_database_ids_are_numbered_from_zero_in_id_order() -> None:
    frame = pd.DataFrame({"user_id": [7_000_000_000, 42, 42], "item_id": [5, 10**12, 5], "event": "view",
                          "timestamp": [1, 2, 3]})
    numbered, ids = number_ids(check_interactions(frame, "clicks.csv"))
    assert numbered["user_id"].tolist() == [1, 0, 0] and numbered["item_id"].tolist() == [0, 1, 0]
    assert ids["user_id"].tolist() == [42, 7_000_000_000] and ids["item_id"].tolist() == [5, 10**12]


def test_text_ids_are_kept_as_text_and_a_column_of_numbers_must_be_integers() -> None:
    """SKUs, UUIDs and account names are ids as they are; a numeric column with a negative is still an error."""
    frame = pd.DataFrame({"user_id": ["A2SUAM1J3GNN3B", "7", "A2SUAM1J3GNN3B"], "item_id": [5, 10**12, 5],
                          "event": "view", "timestamp": [1, 2, 3]})
    checked = check_interactions(frame, "reviews.csv")
    numbered, ids = number_ids(checked)
    assert numbered["user_id"].tolist() == [1, 0, 1] and ids["user_id"].tolist() == ["7", "A2SUAM1J3GNN3B"]
    assert ids["item_id"].tolist() == [5, 10**12]
    with pytest.raises(DataError, match="reviews.csv: column 'item_id': 1 value.*missing"):
        check_interactions(frame.assign(item_id=["B01", None, "B02"]), "reviews.csv")
    with pytest.raises(DataError, match="column 'item_id': 1 value.*non-negative integers"):
        check_interactions(frame.assign(item_id=[5, -1, 2.5]), "reviews.csv")


def test_the_pipeline_name_picks_its_config_model_and_errors_name_the_field() -> None:
    payload = {"pipeline": "ecommerce_recommendations", "registry": {"model_name": "recs"}}
    assert isinstance(parse_pipeline_config(payload, "config.yaml"), RecommendPipelineConfig)
    with pytest.raises(ConfigError, match=r"config.yaml: invalid pipeline config: train.embeding_dim: Extra inputs "
                                          r"are not permitted \(did you mean 'embedding_dim'\?\)"):
        parse_pipeline_config({**payload, "train": {"embeding_dim": 8}}, "config.yaml")
    with pytest.raises(ConfigError, match=r"config.yaml: invalid pipeline config: train.scaling: the recommender "
                                          r"trains on CPU workers"):
        parse_pipeline_config({**payload, "train": {"scaling": {"use_gpu": True}}}, "config.yaml")
    two = parse_pipeline_config({**payload, "train": {"scaling": {"num_workers": 2, "use_gpu": "auto"}}}, "c.yaml")
    assert two.train.scaling.model_dump() == {"num_workers": 2, "cpus_per_worker": "auto", "use_gpu": False}
    assert one_worker_unless_asked(two.train.scaling).num_workers == 2
    assert one_worker_unless_asked(RecommendTrainConfig().scaling).num_workers == 1


MOVIELENS = pd.DataFrame({"userId": [1, 1, 1, 1, 1, 1, 2, 2], "movieId": [10, 20, 30, 40, 50, 60, 10, 70],
                          "rating": [4.0, 3.5, 5.0, 1.0, 2.0, 4.5, 3.0, 5.0],
                          "timestamp": [964982703, 964981247, 964982224, 964983815, 964982931, 964982400, 1, 2]})


def test_an_export_with_its_own_column_names_is_read_through_the_config() -> None:
    """MovieLens' ratings.csv as it comes: userId and movieId, no event column, a rating the stages do not use."""
    with pytest.raises(DataError, match=r"ratings.csv: missing column\(s\) \['user_id', 'item_id'\]; the file has "
                                        r"\['userId', 'movieId', 'rating', 'timestamp'\]. Name yours in the config's "
                                        r"interactions.columns \(user_id: userId, item_id: <your column>\)"):
        check_interactions(MOVIELENS, "ratings.csv")
    columns = InteractionColumns(user_id="userId", item_id="movieId")
    checked = check_interactions(MOVIELENS, "ratings.csv", columns)
    assert list(checked.columns) == ["user_id", "item_id", "timestamp"] and checked["item_id"].tolist()[:2] == [10, 20]
    actions, no_events = columns.model_copy(update={"event": "action"}), columns.model_copy(update={"event": None})
    with pytest.raises(DataError, match="column 'action': unknown value.*interactions.columns.event: null"):
        check_interactions(MOVIELENS.assign(action="addtocart"), "ratings.csv", actions)
    with pytest.raises(DataError, match=r"missing column\(s\) \['action'\]"):  # named, so expected
        check_interactions(MOVIELENS, "ratings.csv", actions)
    ignored = check_interactions(MOVIELENS.assign(event="addtocart"), "ratings.csv", no_events)
    assert "event" not in ignored.columns
    with pytest.raises(DataError, match="ratings.csv: column 'movieId': 1 value"):  # the file's name for it
        check_interactions(MOVIELENS.assign(movieId=[-1, *MOVIELENS["movieId"][1:]]), "ratings.csv", columns)


def test_a_file_without_events_is_split_and_published(tmp_path: Path) -> None:
    MOVIELENS.to_csv(tmp_path / "ratings.csv", index=False)
    config = InteractionsConfig(columns=InteractionColumns(user_id="userId", item_id="movieId"))
    manifest = prepare(str(tmp_path / "ratings.csv"), config, SplitConfig(), str(tmp_path / "out"),
                       KeelSettings(home=tmp_path / ".keel"))
    assert manifest["events"] == {} and manifest["users"] == 2 and manifest["split_rows"] == {"train": 5, "val": 1,
                                                                                            "test": 2}
    test = pd.read_parquet(tmp_path / "out" / "test.parquet")
    assert test["item_id"].tolist() == [4, 3]  # user 1's two latest, movies 50 then 40, as rows 4 and 3


def test_explicit_ratings_keep_only_what_users_liked(tmp_path: Path) -> None:
    """MovieLens with min_rating 4: the 1-4.5 star ratings below 4 are no positive; the rest are split."""
    MOVIELENS.to_csv(tmp_path / "ratings.csv", index=False)
    config = InteractionsConfig(columns=InteractionColumns(user_id="userId", item_id="movieId", rating="rating"),
                                min_rating=3.0)
    manifest = prepare(str(tmp_path / "ratings.csv"), config, SplitConfig(min_train_interactions=1),
                       str(tmp_path / "out"), KeelSettings(home=tmp_path / ".keel"))
    assert manifest["rated_below_min_rating"] == 2 and manifest["rows"] == 6 and "2 rated below 3.0" in \
        manifest["summary"]
    kept = pd.concat(pd.read_parquet(tmp_path / "out" / f"{name}.parquet") for name in ("train", "val", "test"))
    assert (kept["rating"] >= 3.0).all()
    with pytest.raises(DataError, match=r"no interaction is rated 6.0 or more \(ratings run 1.0..5.0\)"):
        prepare(str(tmp_path / "ratings.csv"), config.model_copy(update={"min_rating": 6.0}), SplitConfig(),
                str(tmp_path / "none"), KeelSettings(home=tmp_path / ".keel"))
    with pytest.raises(DataError, match="column 'rating': 1 value.*not numbers"):
        check_interactions(MOVIELENS.assign(rating=["4", *["x"], *MOVIELENS["rating"][2:]]), "ratings.csv",
                           config.columns)
    with pytest.raises(ConfigError, match="min_rating needs the ratings' column"):
        parse_pipeline_config({"pipeline": "ecommerce_recommendations", "registry": {"model_name": "recs"},
                               "interactions": {"min_rating": 4}}, "config.yaml")
    assert not (tmp_path / "none").exists()


def test_two_columns_cannot_be_read_from_one() -> None:
    payload = {"pipeline": "ecommerce_recommendations", "registry": {"model_name": "recs"},
               "interactions": {"columns": {"user_id": "id", "item_id": "id"}}}
    with pytest.raises(ConfigError, match="interactions.columns: .*each column needs its own name"):
        parse_pipeline_config(payload, "config.yaml")
