"""The promotion gate's rules, on hand-made reports."""

from __future__ import annotations

from typing import Any

import pytest

from keel.config import GateConfig
from keel.gate import decide, require


def report(f1: float, slices: dict[str, float] | None = None, dp: float = 0.0, eo: float = 0.0,
           gated: bool = True) -> dict[str, Any]:
    return {"f1_macro": f1,
            "slices": [{"column": "age", "slice": name, "gated": gated, "f1_macro": value}
                       for name, value in (slices or {}).items()],
            "fairness": {"age": {"demographic_parity_difference": dp, "equalized_odds_difference": eo}}}


GATE = GateConfig(tolerance=0.01, slice_tolerance=0.05, max_demographic_parity_difference=0.2,
                  max_equalized_odds_difference=0.1)


def test_no_champion_passes_on_fairness_alone() -> None:
    decision = decide(report(0.5), None, None, "f1_macro", True, GATE)
    assert decision.passed and decision.champion_version is None
    assert any("no champion yet" in r for r in decision.reasons)


@pytest.mark.parametrize("challenger, passed, gap", [(0.905, True, "better by 0.0050"), (0.9, True, "as good"),
                                                    (0.89, True, "worse by +0.0100"),
                                                    (0.8899, False, "worse by +0.0101")])
def test_overall_metric_within_tolerance(challenger: float, passed: bool, gap: str) -> None:
    decision = decide(report(challenger), report(0.9), "3", "f1_macro", True, GATE)
    assert decision.passed is passed
    assert f"vs champion v3 0.9000 ({gap}, tolerance 0.01)" in decision.reasons[0]


def test_lower_is_better_metrics_flip_the_comparison() -> None:
    assert decide(report(0.30), report(0.31), "1", "f1_macro", False, GATE).passed
    assert not decide(report(0.33), report(0.31), "1", "f1_macro", False, GATE).passed


def test_a_regressing_slice_fails_the_gate_and_is_named() -> None:
    champion = report(0.9, {"<40": 0.9, ">=40": 0.9})
    decision = decide(report(0.95, {"<40": 0.99, ">=40": 0.84}), champion, "1", "f1_macro", True, GATE)
    assert not decision.passed
    assert decision.failures == ["slice age >=40: f1_macro 0.8400 vs champion v1 0.9000 "
                                 "(worse by +0.0600, slice tolerance 0.05)"]


def test_small_slices_are_not_gated() -> None:
    champion = report(0.9, {"<40": 0.9}, gated=False)
    assert decide(report(0.9, {"<40": 0.1}, gated=False), champion, "1", "f1_macro", True, GATE).passed


@pytest.mark.parametrize("dp, eo, failed", [(0.25, 0.0, "demographic_parity"), (0.0, 0.15, "equalized_odds")])
def test_fairness_bounds(dp: float, eo: float, failed: str) -> None:
    decision = decide(report(0.9, dp=dp, eo=eo), None, None, "f1_macro", True, GATE)
    assert not decision.passed and len(decision.failures) == 1 and failed in decision.failures[0]
    assert decision.summary.startswith("gate failed: ")


def test_an_unset_fairness_bound_reports_the_gap_and_never_fails() -> None:
    parity_only = GateConfig(max_equalized_odds_difference=0.1)
    decision = decide(report(0.9, dp=0.9, eo=0.05), None, None, "f1_macro", True, parity_only)
    assert decision.passed
    assert "demographic_parity_difference over age 0.9000 (reported, not bounded)" in decision.reasons
    assert "ok: equalized_odds_difference over age 0.0500 (max 0.1)" in decision.reasons
    assert not decide(report(0.9, dp=0.9, eo=0.2), None, None, "f1_macro", True, parity_only).passed


def test_fairness_over_a_column_with_one_slice_big_enough_is_reported_unmeasured_not_ok() -> None:
    """With one slice of min_slice_rows rows there is no gap to measure: its 0.0 passed every bound as "ok"."""
    one_slice = report(0.9)
    one_slice["fairness"]["age"]["groups"] = 1
    decision = decide(one_slice, None, None, "f1_macro", True, GATE)
    assert decision.passed and not any("ok: " in r and "parity" in r for r in decision.reasons)
    assert ("fairness over age not measured: 1 of its slices has evaluate.min_slice_rows rows or more, and a gap "
            "needs two") in decision.reasons
    one_slice["fairness"]["age"]["groups"] = 2
    assert "ok: demographic_parity_difference over age 0.0000 (max 0.2)" in decide(
        one_slice, None, None, "f1_macro", True, GATE).reasons


def test_nan_metric_fails() -> None:
    assert not decide(report(float("nan")), None, None, "f1_macro", True, GATE).passed


def test_a_pipelines_own_rule_fails_a_passing_gate_and_is_named() -> None:
    decision = decide({"f1_macro": 0.8}, None, None, "f1_macro", True, GateConfig())
    require(decision, True, "kept: gain +0.15 over the baseline")
    assert decision.passed and decision.reasons[-1] == "ok: kept: gain +0.15 over the baseline"
    require(decision, False, "gain +0.02 over the baseline (min +0.1)")
    assert not decision.passed and decision.failures == ["gain +0.02 over the baseline (min +0.1)"]
    assert "gain +0.02" in decision.summary
