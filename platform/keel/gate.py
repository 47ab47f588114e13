"""The promotion gate: whether a challenger may replace the champion, with a reason per check.

Pure functions over two evaluation reports (the challenger's and the
champion's, scored on the same test rows), so every rule is testable without
MLflow. The evaluate stage decides; the register stage applies the decision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from keel.config import GateConfig


@dataclass
class GateDecision:
    passed: bool
    champion_version: str | None
    reasons: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def verdict(self) -> str:
        return gate_verdict(self.passed)

    @property
    def summary(self) -> str:
        return f"{self.verdict}: " + "; ".join(self.failures or self.reasons)


def gate_verdict(passed: bool) -> str:
    """A stage's line in a run's summary: the checks follow it there, a line each (the register step's)."""
    return "gate passed" if passed else "gate failed"


def _worse_by(candidate: float, incumbent: float, greater_is_better: bool) -> float:
    """How much worse ``candidate`` is than ``incumbent`` (negative when better)."""
    return incumbent - candidate if greater_is_better else candidate - incumbent


def _gap_words(gap: float) -> str:
    """``worse by +0.0613``, ``better by 0.0284``: a reason that reads "worse by -0.0284" makes a reader
    double-check a promotion that was an improvement."""
    if round(gap, 4) == 0:
        return "as good"
    return f"worse by {gap:+.4f}" if gap > 0 else f"better by {-gap:.4f}"


def _check(decision: GateDecision, ok: bool, message: str) -> None:
    decision.reasons.append(("ok: " if ok else "FAIL: ") + message)
    if not ok:
        decision.failures.append(message)


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, champion_version: str | None,
           metric: str, greater_is_better: bool, config: GateConfig, baseline: str = "") -> GateDecision:
    """Overall metric within ``tolerance`` of the champion's, no gated slice worse by more than
    ``slice_tolerance``, fairness gaps within their bounds. No champion: only fairness applies.

    ``baseline`` names what the reasons compare with (default ``champion vN``): the same rules judge a
    model's live rows against its own registered evaluation (:mod:`keel.monitor.performance`)."""
    decision = GateDecision(passed=True, champion_version=champion_version)
    baseline = baseline or f"champion v{champion_version}"
    value = float(challenger[metric])
    if math.isnan(value):
        _check(decision, False, f"{metric} is NaN on the test split")
    elif champion is None:
        decision.reasons.append(f"no champion yet: {metric} {value:.4f} not compared")
    else:
        incumbent = float(champion[metric])
        gap = _worse_by(value, incumbent, greater_is_better)
        _check(decision, math.isnan(incumbent) or gap <= config.tolerance + 1e-12,
               f"{metric} {value:.4f} vs {baseline} {incumbent:.4f} "
               f"({_gap_words(gap)}, tolerance {config.tolerance})")
        _check_slices(decision, challenger, champion, metric, greater_is_better, config, baseline)
    _check_fairness(decision, challenger, config)
    decision.passed = not decision.failures
    return decision


def require(decision: GateDecision, ok: bool, message: str) -> None:
    """A pipeline's own rule on top of :func:`decide`: a reason like the others, failing the gate when not met."""
    _check(decision, ok, message)
    decision.passed = not decision.failures


def _check_slices(decision: GateDecision, challenger: dict[str, Any], champion: dict[str, Any], metric: str,
                  greater_is_better: bool, config: GateConfig, baseline: str) -> None:
    theirs = {(s["column"], s["slice"]): s for s in champion.get("slices", [])}
    for mine in challenger.get("slices", []):
        other = theirs.get((mine["column"], mine["slice"]))
        if not mine["gated"] or other is None or metric not in mine or math.isnan(mine[metric]) \
                or math.isnan(other[metric]):
            continue
        gap = _worse_by(mine[metric], other[metric], greater_is_better)
        _check(decision, gap <= config.slice_tolerance + 1e-12,
               f"slice {mine['column']} {mine['slice']}: {metric} {mine[metric]:.4f} vs {baseline} "
               f"{other[metric]:.4f} ({_gap_words(gap)}, slice tolerance {config.slice_tolerance})")


def fairness_measured(measures: dict[str, Any]) -> bool:
    """Whether a slice column's fairness gaps were measured: a gap needs two slices of ``min_slice_rows`` rows.
    Reports written before the count was recorded have no ``groups`` and count as measured."""
    return bool(measures.get("groups", 2) >= 2)


def _check_fairness(decision: GateDecision, challenger: dict[str, Any], config: GateConfig) -> None:
    bounds = {"demographic_parity_difference": config.max_demographic_parity_difference,
              "equalized_odds_difference": config.max_equalized_odds_difference}
    for column, measures in challenger.get("fairness", {}).items():
        if not fairness_measured(measures):  # the gaps read 0 then: a bound would pass unmeasured
            decision.reasons.append(f"fairness over {column} not measured: {measures['groups']} of its slices has "
                                    "evaluate.min_slice_rows rows or more, and a gap needs two")
            continue
        for name, bound in bounds.items():
            value = measures.get(name)
            if value is None or math.isnan(value):
                continue
            if bound is None:
                decision.reasons.append(f"{name} over {column} {value:.4f} (reported, not bounded)")
            else:
                _check(decision, value <= bound + 1e-12, f"{name} over {column} {value:.4f} (max {bound})")
