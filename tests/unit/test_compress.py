"""Compression variants and the policy, on a real (small) trained model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from keel import storage
from keel.compress import Policy, VariantReport, choose, choose_variant, compress, prune_structured, serialized_bytes
from keel.config import CompressConfig
from keel.errors import CompressionError, ConfigError
from keel.predictor import Predictor
from keel.settings import KeelSettings
from keel.train.model import MLPClassifier, MLPSpec, load_model, quantize_int8
from tests.conftest import artifact_files
from tests.stages import run_stages, small_config, write_small_source


def test_a_layer_without_units_fails_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match=r"train.hidden_sizes.1: Input should be greater than 0; "
                                          r"compress.student_hidden_sizes: List should have at least 1 item"):
        small_config(train={"hidden_sizes": [64, 0]}, compress={"student_hidden_sizes": []})


def test_a_drop_or_tolerance_given_in_points_is_refused_as_more_than_a_whole_score() -> None:
    """``max_accuracy_drop: 5`` meant five points would register any variant, and a gate tolerance of 2 would
    promote any challenger; 1.0 (any drop at all) and a negative tolerance (beat the champion by a margin) stay."""
    whole = "is more than a whole score: give a share of a score between 0 and 1 (0.01 is one point)"
    with pytest.raises(ConfigError, match=rf"compress.max_accuracy_drop: 5 {re.escape(whole)}; "
                                          rf"evaluate.gate.tolerance: 2 {re.escape(whole)}$"):
        small_config(compress={"max_accuracy_drop": 5}, evaluate={"gate": {"tolerance": 2}})
    config = small_config(compress={"max_accuracy_drop": 1.0}, evaluate={"gate": {"tolerance": -0.01}})
    assert (config.compress.max_accuracy_drop, config.evaluate.gate.tolerance) == (1.0, -0.01)


def variant(name: str, accuracy_drop: float, latency: float, size: int = 100) -> VariantReport:
    return VariantReport(name=name, accuracy=0.9 - accuracy_drop, f1_macro=0.9, accuracy_drop=accuracy_drop,
                         parameters=10, nonzero_parameters=10, size_bytes=size,
                         latency_p50_ms_batch1=latency, latency_p50_ms_batch32=latency * 4)


POLICY = CompressConfig(max_accuracy_drop=0.01, latency_budget_ms=1.0)


def test_policy_picks_the_fastest_within_bounds_and_says_why_the_others_lost() -> None:
    chosen, reason = choose_variant([variant("baseline", 0, 0.9), variant("int8", 0.005, 0.3),
                                     variant("distilled", 0.02, 0.1), variant("pruned", 0, 0.5)], POLICY)
    assert chosen == "int8"
    assert "distilled: accuracy drop 0.0200 > 0.01" in reason and "baseline: slower (0.900 ms)" in reason


def test_policy_treats_near_equal_latency_as_a_tie_won_by_accuracy() -> None:
    chosen, _ = choose_variant([variant("baseline", 0, 0.101), variant("pruned", 0.008, 0.100)], POLICY)
    assert chosen == "baseline"


def test_policy_batch_32_uses_batch_32_latency() -> None:
    reports = [variant("a", 0, 0.2), VariantReport(**{**variant("b", 0, 0.3).__dict__, "latency_p50_ms_batch32": 0.1})]
    assert choose_variant(reports, POLICY.model_copy(update={"policy_batch_size": 32}))[0] == "b"


def test_an_f1_policy_bounds_the_f1_drop_and_names_its_own_setting() -> None:
    """The intents pipeline's policy: macro-F1 lost, no latency budget; accuracy drops do not count."""
    reports = [VariantReport(**{**variant(name, accuracy_drop=0.3, latency=latency).__dict__, "f1_macro_drop": drop})
               for name, drop, latency in (("fine_tuned", 0.0, 10.0), ("student", 0.01, 3.0), ("tiny", 0.05, 1.0))]
    policy = Policy("f1_macro", 0.02, float("inf"), 1, "compress.max_f1_drop")
    chosen, reason = choose(reports, policy)
    assert chosen == "student" and "tiny: f1_macro drop 0.0500 > 0.02" in reason and "budget" not in reason
    with pytest.raises(CompressionError, match=r"meets compress.max_f1_drop \(at batch 1\): fine_tuned"):
        choose([VariantReport(**{**reports[0].__dict__, "f1_macro_drop": 0.5})], policy)


def test_no_eligible_variant_is_an_error_naming_the_bounds() -> None:
    with pytest.raises(CompressionError, match=r"latency_budget_ms.*baseline: 2.000 ms > budget 1.0 ms"):
        choose_variant([variant("baseline", 0, 2.0)], POLICY)


def save_int8(model: torch.nn.Module, spec: MLPSpec, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "model.pt")
    (directory / "model.json").write_text(spec.model_dump_json(exclude_defaults=True))


def test_int8_leaves_the_small_output_layer_in_float_and_round_trips(tmp_path: Path) -> None:
    spec = MLPSpec(input_dim=16, hidden_sizes=[512, 256], num_classes=3)
    model = quantize_int8(MLPClassifier(spec), min_weights=CompressConfig().int8_min_layer_weights)
    hidden, output = model.layers[3], model.layers[-1]
    assert type(output) is torch.nn.Linear and "quantized" in type(hidden).__module__  # 256 x 3 vs 512 x 256
    save_int8(model, spec.model_copy(update={"quantized": True, "quantize_min_weights": 4096}), tmp_path)
    loaded = load_model(tmp_path)
    features = torch.randn(5, 16)
    assert torch.equal(loaded(features), model(features))
    assert serialized_bytes(MLPClassifier(spec)) / serialized_bytes(model) > 3.5


def test_an_int8_model_saved_before_the_small_layer_rule_still_loads(tmp_path: Path) -> None:
    """Its spec has no quantize_min_weights and its weights have every Linear layer in int8."""
    spec = MLPSpec(input_dim=16, hidden_sizes=[256, 128], num_classes=3)
    model = quantize_int8(MLPClassifier(spec))
    assert "quantized" in type(model.layers[-1]).__module__
    save_int8(model, spec.model_copy(update={"quantized": True}), tmp_path)
    assert "quantize_min_weights" not in (tmp_path / "model.json").read_text()
    features = torch.randn(5, 16)
    assert torch.equal(load_model(tmp_path)(features), model(features))


def test_structured_pruning_keeps_the_strongest_units_exactly() -> None:
    spec = MLPSpec(input_dim=3, hidden_sizes=[4], num_classes=2)
    teacher = MLPClassifier(spec)
    with torch.no_grad():
        teacher.layers[0].weight.copy_(torch.tensor([[1.0, 0, 0], [9, 0, 0], [0, 0, 0.1], [0, 5, 0]]))
    data = type("Split", (), {"features": torch.randn(8, 3), "labels": torch.randint(0, 2, (8,))})()
    student, small = prune_structured(teacher, spec, data, data, CompressConfig(keep_units=0.5, finetune_epochs=0))
    assert small.hidden_sizes == [2]
    assert student.layers[0].weight.tolist() == [[9, 0, 0], [0, 5, 0]]  # units 1 and 3, in order
    assert torch.equal(student.layers[-1].weight, teacher.layers[-1].weight[:, [1, 3]])


def test_fine_tuning_and_distillation_get_row_major_features(settings: KeelSettings, tmp_path: Path) -> None:
    """pandas gives a Parquet table's float columns over column-major; every fine-tuning step gathers rows."""
    import pandas as pd

    from keel.compress import _split

    path = tmp_path / "train.parquet"
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "label": [0, 1]}).to_parquet(path, index=False)
    split = _split(str(path), ["a", "b"], settings)
    assert split.features.is_contiguous() and split.features.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    assert split.labels.tolist() == [0, 1]


def test_compress_stage_publishes_every_variant_and_the_choice(settings: KeelSettings, tmp_path: Path) -> None:
    uris = run_stages(settings, "run-c", write_small_source(tmp_path, rows=300))
    output = storage.stage_uri(settings, "run-c", "compress")
    config = CompressConfig(latency_budget_ms=100.0, max_accuracy_drop=1.0, finetune_epochs=2, distill_epochs=5,
                            latency_repeats=20)
    manifest = compress(uris["train"], uris["preprocess"], config, output, settings)
    assert set(manifest["variants"]) == {"baseline", "pruned_unstructured", "pruned_structured", "int8", "distilled"}
    unstructured = manifest["variants"]["pruned_unstructured"]
    assert unstructured["nonzero_parameters"] < 0.6 * unstructured["parameters"]  # half the weights; biases stay
    assert manifest["variants"]["pruned_structured"]["parameters"] < manifest["variants"]["baseline"]["parameters"]
    chosen = Predictor.load(Path(manifest["model_uri"]))  # a complete model directory
    assert manifest["model_uri"].endswith(f"variants/{manifest['chosen']}") and chosen.classes == ["no", "yes"]
    report = json.loads((Path(output) / "report.json").read_text())
    assert report["chosen"] == manifest["chosen"] and "<table" in (Path(output) / "report.html").read_text()
    assert (Path(output) / "accuracy_vs_latency.png").stat().st_size > 1000


def test_a_failed_policy_publishes_nothing(settings: KeelSettings, tmp_path: Path) -> None:
    uris = run_stages(settings, "run-d", write_small_source(tmp_path))
    before = set(artifact_files(settings))
    with pytest.raises(CompressionError):
        compress(uris["train"], uris["preprocess"], CompressConfig(methods=["int8"], latency_budget_ms=1e-6,
                 latency_repeats=10), storage.stage_uri(settings, "run-d", "compress"), settings)
    assert set(artifact_files(settings)) == before
