"""A recommender checked on the interactions that came in after it was registered.

The pipeline scores a recommender on each user's latest interactions, which it held out of training. Later
interactions are the same test, taken again: each user the model was trained on who has since used items they
had not seen. The check asks what the model recommends them (their training items masked, as served) and
compares that with what they went on to use. It is judged by the rules the version was promoted on. Its
promotion metric (NDCG@k in the shipped config) must be within the tolerance of its registered value. Its NDCG@k
must also be at least the version's ``min_lift_over_popular`` times the most-popular list's NDCG@k on the same
users, so a drift that hurts every recommender alike is told apart from one that hurts only this model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from keel.config import GateConfig
from keel.errors import DataError
from keel.gate import decide, require
from keel.recommend.config import InteractionsConfig, RecommendEvaluateConfig
from keel.recommend.data import check_interactions, keep_liked
from keel.recommend.evaluate import model_scorer
from keel.recommend.metrics import Scorer, ranking_metrics
from keel.recommend.model import SeenPairs
from keel.recommend.recommender import Recommender, rows_of

if TYPE_CHECKING:
    import pandas as pd

    from keel.monitor.performance import PerformanceConfig, Registration

LEFT_OUT = {"unknown_user": "by users the model was not trained on",
            "unknown_item": "of items it does not know",
            "already_seen": "it had in training"}


@dataclass
class NewInteractions:
    """A file's liked interactions as the check reads them, in the model's rows."""

    known: pd.DataFrame  # by users the model was trained on, with items it knows and they had not seen
    strangers: pd.DataFrame  # by users it does not know (numbered from 0), with items it knows
    left_out: dict[str, int]  # counts by reason (LEFT_OUT); a stranger's interactions count as unknown_user


def new_interactions(recommender: Recommender, frame: pd.DataFrame, source: str,
                     interactions: InteractionsConfig) -> NewInteractions:
    """The interactions the model can be tested on, those of users it was not trained on, and how many were
    left out, by reason. The file is read as the version's training file was (its column names, ``min_rating``)."""
    import pandas as pd

    checked = check_interactions(frame, source, interactions.columns)
    liked, _ = keep_liked(checked, interactions.min_rating, source)
    liked = liked.drop_duplicates(["user_id", "item_id"])
    users = rows_of(recommender.user_ids, liked["user_id"].to_numpy())
    items = rows_of(recommender.item_ids, liked["item_id"].to_numpy())
    trained = np.isin(users, np.fromiter(recommender.seen, dtype=np.int64, count=len(recommender.seen)))
    known_item = items >= 0
    already_seen = trained & known_item & training_pairs(recommender).contains(
        torch.from_numpy(users), torch.from_numpy(items)).numpy()
    keep = trained & known_item & ~already_seen
    stranger = ~trained & known_item
    stranger_rows = pd.factorize(liked["user_id"].to_numpy()[stranger])[0].astype(np.int64)
    left_out = {"unknown_user": int((~trained).sum()), "unknown_item": int((trained & ~known_item).sum()),
                "already_seen": int(already_seen.sum())}
    return NewInteractions(pd.DataFrame({"user_id": users[keep], "item_id": items[keep]}),
                           pd.DataFrame({"user_id": stranger_rows, "item_id": items[stranger]}), left_out)


def training_pairs(recommender: Recommender) -> SeenPairs:
    """The version's training interactions as the sorted keys the pipeline's own evaluation looks pairs up in."""
    empty = np.empty(0, dtype=np.int64)
    users = np.concatenate([np.full(len(seen), user, dtype=np.int64) for user, seen in recommender.seen.items()]
                           or [empty])
    items = np.concatenate([seen.astype(np.int64) for seen in recommender.seen.values()] or [empty])
    return SeenPairs(torch.from_numpy(users), torch.from_numpy(items), len(recommender.item_ids))


def popular_scorer(recommender: Recommender) -> Scorer:
    """The most-popular list the version answers strangers with, as scores: the same ranking for everyone."""
    scores = np.full(len(recommender.item_ids), -np.inf, dtype=np.float32)
    scores[recommender.popular] = -np.arange(len(recommender.popular), dtype=np.float32)
    return lambda users: np.broadcast_to(scores, (len(users), len(scores)))


def ranking_report(recommender: Recommender, registration: Registration, frame: pd.DataFrame, source: str,
                   config: PerformanceConfig) -> dict[str, Any]:
    """The evaluate step's figures on the new interactions, with the verdict against the registration."""
    from keel.monitor.performance import section_from_params

    origin = f"models:/{registration.name}/{registration.version}"
    interactions = section_from_params(registration.params, "interactions", InteractionsConfig, origin)
    rules = section_from_params(registration.params, "evaluate", RecommendEvaluateConfig, origin)
    found = new_interactions(recommender, frame, source, interactions)
    pairs, left_out = found.known, found.left_out
    users = int(pairs["user_id"].nunique())
    if users < config.min_rows:
        dropped = "; ".join(f"{count} {LEFT_OUT[reason]}" for reason, count in left_out.items() if count)
        raise DataError(f"{source}: {users} user(s) with new interactions the model can be tested on "
                        f"({len(pairs)} interactions{'; left out: ' + dropped if dropped else ''}); a verdict needs "
                        f"at least {config.min_rows} (--min-rows, performance.min_rows).")
    k, catalogue = rules.k, len(recommender.item_ids)
    metrics = ranking_metrics(model_scorer(recommender.model), pairs, recommender.seen, k, catalogue)
    popular = ranking_metrics(popular_scorer(recommender), pairs, recommender.seen, k, catalogue)
    ndcg, popular_ndcg = metrics[f"ndcg_at_{k}"], popular[f"ndcg_at_{k}"]
    lift = ndcg / max(popular_ndcg, 1e-12)
    decision = decide(metrics, registration.evaluation, registration.version, registration.metric,
                      registration.greater_is_better, GateConfig(tolerance=config.tolerance),
                      baseline=f"registered v{registration.version}")
    require(decision, ndcg >= rules.min_lift_over_popular * popular_ndcg,
            f"NDCG@{k} {ndcg:.4f} is {lift:.2f}x the most-popular list's {popular_ndcg:.4f} on the same users "
            f"(min {rules.min_lift_over_popular}x, as at registration)")
    headline = [f"recall_at_{k}", f"ndcg_at_{k}", "ndcg_lift_over_popular"]
    return {**metrics, "k": k, "baseline_popular": popular, "ndcg_lift_over_popular": lift,
            "headline": headline, "gate": decision.to_dict(), "verdict": "ok" if decision.passed else "degraded",
            "model_name": registration.name, "version": registration.version, "metric": registration.metric,
            "rows": len(pairs), "users": users, "unlabeled_rows": sum(left_out.values()), "left_out": left_out,
            "measured_on": f"{len(pairs)} new interactions of {users} users",
            "new_users": served_to_new_users(recommender, found.strangers, k),
            "registered": {name: registration.evaluation.get(name) for name in headline}}


def served_to_new_users(recommender: Recommender, strangers: pd.DataFrame, k: int) -> dict[str, float | int]:
    """How the most-popular list, which serving answers users it does not know, did for the new users in the
    file: reported beside the verdict, not judged (the version registered no figure for it). Their number is a
    reason to retrain of its own: the next version would know them."""
    if strangers.empty:
        return {"users": 0, "interactions": 0}
    scored = ranking_metrics(popular_scorer(recommender), strangers, {}, k, len(recommender.item_ids))
    return {"users": int(strangers["user_id"].nunique()), "interactions": len(strangers),
            f"ndcg_at_{k}": scored[f"ndcg_at_{k}"], f"recall_at_{k}": scored[f"recall_at_{k}"]}


def new_users_line(section: dict[str, Any]) -> str:
    """The new users' figures in a sentence, for the CLI and the HTML report."""
    scores = ", ".join(f"{name.replace('_at_', '@')} {value:.4f}" for name, value in section.items()
                       if name.startswith(("ndcg", "recall")))
    return (f"{section['users']} users the model does not know were served the most-popular list: {scores} on "
            f"their {section['interactions']} interactions (not judged; a retrained version would know them)")
