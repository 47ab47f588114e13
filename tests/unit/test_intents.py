"""The customer-service intents: data, privacy, the data step and the model's saved form."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.errors import DataError
from keel.intents.config import UtteranceColumns, UtterancesConfig
from keel.intents.data import FIRST, INTENTS, LAST, generate_utterances
from keel.intents.model import (POOLER, WEIGHTS_FILE, IntentModel, IntentSpec, load_tokenizer, pack,
                                pretrained_classifier, pretrained_dir, save_intent_model, tokenize)
from keel.intents.prepare import check_utterances, protect, pseudonym_key, split_frames
from keel.intents.privacy import ScrubReport, pseudonymise, scrub
from keel.settings import KeelSettings, load_settings
from tests.conftest import artifact_files


def test_the_generator_is_seeded_large_enough_and_holds_out_whole_phrasings() -> None:
    frame = generate_utterances()
    assert len(frame) >= 3000 and frame["intent"].nunique() == len(INTENTS) >= 12
    assert frame.equals(generate_utterances())
    train, held_out = (set(frame.loc[frame["family"] == f, "phrasing"]) for f in ("train", "held_out"))
    assert held_out and not train & held_out  # no test phrasing is ever trained on
    assert frame["text"].str.contains("@example.com").any() and frame["text"].str.contains(r"\+44").any()


@pytest.mark.parametrize("text, expected", [
    ("refund request, order ORD-4521983, email anna.smith7@example.com",
     "refund request, order <ORDER_ID>, email <EMAIL>"),
    ("card 4111 1111 1111 1111 got an error at checkout", "card <CARD> got an error at checkout"),
    ("can someone call me at +44 7911 123456", "can someone call me at <PHONE>"),
    ("I need a person, this is Grace Nguyen", "I need a person, this is <NAME>"),
    ("where is my order #8812345", "where is my order <ORDER_ID>"),
    ("is this jacket waterproof", "is this jacket waterproof"),
    # names outside ASCII, with particles, apostrophes and three parts; lower case after "my name is"
    ("thanks, Łukasz Wójcik", "thanks, <NAME>"),
    ("I'm Émilie Dubois and my parcel is late", "I'm <NAME> and my parcel is late"),
    ("this is Nguyễn Văn An", "this is <NAME>"),
    ("regards, Seán O'Brien", "regards, <NAME>"),
    ("Maria de la Cruz here, where is my refund", "<NAME> here, where is my refund"),
    ("my name is jürgen müller and I can't log in", "my name is <NAME> and I can't log in"),
    ("my name is spelled wrong on the invoice", "my name is spelled wrong on the invoice"),
    ("please call me back tomorrow", "please call me back tomorrow"),
    # bank accounts, social security numbers, international phone numbers
    ("refund to DE89370400440532013000 please", "refund to <IBAN> please"),
    ("IBAN GB29 NWBK 6016 1331 9268 19", "IBAN <IBAN>"),
    ("my ssn is 123-45-6789", "my ssn is <SSN>"),
    ("ring +44 20 7946 0958 or +1 (555) 123-4567", "ring <PHONE> or <PHONE>"),
    ("it was 25.99 on 2024-03-12, error +12 34", "it was 25.99 on 2024-03-12, error +12 34"),
])
def test_personal_data_becomes_typed_placeholders(text: str, expected: str) -> None:
    assert scrub(text) == expected


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["my name is", "this is", "call me", "back", "and", "wrong", "Anna", "Müller", "de", "la",
                                 "O'Brien", "+44", "20", "7946", "0958", "4111", "1111", "DE89", "3704", "0044",
                                 "123-45-6789", "ORD-12345", "#123456", "a@b.co", "<NAME>"]), max_size=12))
def test_scrubbing_scrubbed_text_changes_nothing(words: list[str]) -> None:
    """The served model scrubs every text, also the already scrubbed ones evaluation sends it."""
    once = scrub(" ".join(words))
    assert scrub(once) == once


def test_the_report_counts_each_kind_replaced() -> None:
    report = ScrubReport()
    scrub("Ana Lima, +351 912 345 678, ana@example.pt, PT50000201231234567890154, 4111 1111 1111 1111", report)
    assert report.replaced == {"NAME": 1, "PHONE": 1, "EMAIL": 1, "IBAN": 1, "CARD": 1}


def test_no_email_phone_or_card_survives_scrubbing_the_whole_corpus() -> None:
    report = ScrubReport()
    scrubbed = generate_utterances()["text"].map(lambda t: scrub(t, report))
    leaks = scrubbed[scrubbed.str.contains(r"@|\d{3}|" + "|".join(FIRST + LAST))]
    assert leaks.empty, leaks.head().tolist()
    assert {"EMAIL", "PHONE", "CARD", "ORDER_ID", "NAME"} <= set(report.replaced)


def test_user_ids_are_pseudonymised_stably_and_only_with_the_key() -> None:
    first, again, other_key = (pseudonymise("user-42", k) for k in (b"k1", b"k1", b"k2"))
    assert first == again != other_key and re.fullmatch(r"u_[0-9a-f]{16}", first)


# ---- the data step: reading, privacy, splits ---------------------------------------------------------------

def test_a_users_file_missing_a_column_or_with_empty_text_is_refused_by_name() -> None:
    config = UtterancesConfig()
    with pytest.raises(DataError, match=r"tickets.csv: missing column\(s\) \['intent'\]"):
        check_utterances(pd.DataFrame({"text": ["hi"]}), "tickets.csv", config)
    with pytest.raises(DataError, match=r"tickets.csv: column 'text': 1 empty value\(s\), first at data row 2"):
        check_utterances(pd.DataFrame({"text": ["hi", " "], "intent": ["a", "b"]}), "tickets.csv", config)
    with pytest.raises(DataError, match=r"column 'split': unknown value\(s\) \['validation'\]"):
        check_utterances(pd.DataFrame({"text": ["hi"], "intent": ["a"], "split": ["validation"]}), "t.csv", config)


def test_a_file_too_small_to_hold_out_validation_rows_is_refused_and_nothing_written(settings: KeelSettings,
                                                                                     tmp_path: Path) -> None:
    """Four training rows per intent at validation_fraction 0.1 leave no validation rows, where early
    stopping would keep the first epoch on a loss of nothing."""
    from keel import storage
    from keel.intents.prepare import prepare_utterances

    source = tmp_path / "tickets.csv"
    pd.DataFrame({"text": [f"message {i}" for i in range(10)], "intent": ["refund", "delivery"] * 5,
                  "split": ["train"] * 8 + ["test"] * 2}).to_csv(source, index=False)
    output = storage.stage_uri(settings, "small", "ingest")
    with pytest.raises(DataError, match=r"tickets.csv: no validation rows: utterances.validation_fraction \(0.1\)"):
        prepare_utterances(str(source), UtterancesConfig(), output, settings)
    assert not artifact_files(settings)


def test_an_intent_with_too_few_utterances_is_refused_by_name_and_nothing_written(settings: KeelSettings,
                                                                                 tmp_path: Path) -> None:
    """One example of an intent teaches the model nothing, and lands in training or testing by chance."""
    from keel import storage
    from keel.intents.prepare import prepare_utterances

    source = tmp_path / "tickets.csv"
    pd.DataFrame({"text": [f"message {i}" for i in range(61)],
                  "intent": ["refund", "delivery"] * 30 + ["discount"]}).to_csv(source, index=False)
    output = storage.stage_uri(settings, "rare", "ingest")
    with pytest.raises(DataError, match=r"tickets.csv: intent\(s\) with fewer than 5 utterances: 'discount' \(1\)\. "
                                        r"Add utterances, .* utterances.min_per_intent sets the floor"):
        prepare_utterances(str(source), UtterancesConfig(), output, settings)
    assert not artifact_files(settings)
    assert "discount" in prepare_utterances(str(source), UtterancesConfig(min_per_intent=1), output,
                                            settings)["labels"]


def test_a_help_desk_export_is_read_under_its_own_column_names() -> None:
    """Bitext's help-desk set names the message `instruction` and has a `category` beside the intent: the config
    names the column, and errors then name the file's column, not Keel's."""
    export = pd.DataFrame({"flags": ["B", "BQZ"], "instruction": ["where is my parcel", " "],
                           "category": ["ORDER", "REFUND"], "intent": ["track_order", "get_refund"],
                           "customer": ["c-1", "c-2"]})
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; the file has \['flags', 'instruction', "
                                        r".*utterances.columns \(text: <your column>\)"):
        check_utterances(export, "bitext.csv", UtterancesConfig())
    columns = UtteranceColumns(text="instruction", user_id="customer")
    with pytest.raises(DataError, match=r"bitext.csv: column 'instruction': 1 empty value\(s\), first at data row 2"):
        check_utterances(export, "bitext.csv", UtterancesConfig(columns=columns))
    checked = check_utterances(export.iloc[:1], "bitext.csv", UtterancesConfig(columns=columns))
    assert list(checked.columns) == ["user_id", "text", "intent", "split"]
    assert checked.iloc[0][["user_id", "text", "intent"]].tolist() == ["c-1", "where is my parcel", "track_order"]
    with pytest.raises(DataError, match=r"missing column\(s\) \['fold'\]"):  # named, so expected
        check_utterances(export, "bitext.csv", UtterancesConfig(columns=columns.model_copy(update={"split": "fold"})))


def test_a_users_file_without_a_split_column_gets_a_seeded_test_share() -> None:
    frame = pd.DataFrame({"text": [f"message {i}" for i in range(1000)], "intent": ["a", "b"] * 500})
    checked = check_utterances(frame, "t.csv", UtterancesConfig(test_fraction=0.2))
    assert 150 < (checked["split"] == "test").sum() < 250 and set(checked["user_id"]) == {""}
    assert checked.equals(check_utterances(frame, "t.csv", UtterancesConfig(test_fraction=0.2)))


def test_protect_scrubs_text_and_pseudonymises_users_before_anything_is_split() -> None:
    frame = pd.DataFrame({"user_id": ["user-1", "user-1", ""], "intent": ["refund"] * 3, "split": ["train"] * 3,
                          "text": ["refund to anna.smith7@example.com", "call +44 7911 123456", "hello"]})
    protected, report = protect(frame, b"key")
    assert protected["text"].tolist() == ["refund to <EMAIL>", "call <PHONE>", "hello"]
    assert protected["user_id"][0] == protected["user_id"][1] != "user-1" and protected["user_id"][2] == ""
    assert dict(report.replaced) == {"EMAIL": 1, "PHONE": 1}


def test_validation_rows_come_from_training_phrasings_and_test_rows_stay_whole(tmp_path: Path) -> None:
    frame = generate_utterances(per_intent=30)
    frame = frame.assign(split=frame["family"].map({"train": "train", "held_out": "test"}))
    splits = split_frames(frame, UtterancesConfig(validation_fraction=0.1))
    assert len(splits["test"]) == (frame["split"] == "test").sum()
    assert set(splits["val"]["family"]) == {"train"} and not set(splits["val"].index) & set(splits["train"].index)
    assert splits["val"]["intent"].nunique() == len(INTENTS)


def test_the_local_pseudonym_key_is_created_once_private_and_a_configured_key_wins(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    first = pseudonym_key(settings)
    assert first == pseudonym_key(settings) and len(first) == 64
    assert (tmp_path / "pseudonym.key").stat().st_mode & 0o077 == 0
    assert pseudonym_key(load_settings(home=tmp_path, pseudonym_key="from-a-secret")) == b"from-a-secret"


# ---- the model: packing, saving, int8 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_layer_model() -> tuple:
    spec = IntentSpec(labels=["refund", "order_status", "cancel_order"], layers=1, max_length=16, dropout=0.0)
    torch.manual_seed(0)
    return pretrained_classifier(spec).eval(), spec, load_tokenizer(pretrained_dir())


def test_padding_beyond_the_longest_row_does_not_change_the_logits(one_layer_model: tuple) -> None:
    model, spec, tokenizer = one_layer_model
    texts = ["where is my order <ORDER_ID>", "refund"]
    with torch.no_grad():
        tight = model(pack(tokenize(tokenizer, texts, spec.max_length)))
        padded = model(pack(tokenize(tokenizer, texts, spec.max_length, pad_to_max=True)))
    assert torch.allclose(tight, padded, atol=1e-5)


def test_a_saved_model_loads_self_contained_and_int8_stays_close(one_layer_model: tuple, tmp_path: Path) -> None:
    model, spec, tokenizer = one_layer_model
    save_intent_model(model, spec, tokenizer, tmp_path / "float")
    save_intent_model(model, spec.model_copy(update={"int8": True}), tokenizer, tmp_path / "int8")
    texts = ["I want a refund for <ORDER_ID>", "cancel it please", "status of my parcel"]
    original = IntentModel(model, spec, tokenizer).probabilities(texts)
    reloaded = IntentModel.load(tmp_path / "float")
    assert torch.allclose(reloaded.probabilities(texts), original, atol=1e-5)
    assert len(reloaded.network.encoder.encoder.layer) == 1
    quantized = IntentModel.load(tmp_path / "int8")
    assert any("quantized" in type(m).__module__ for m in quantized.network.modules())
    assert (quantized.probabilities(texts) - original).abs().max() < 0.05
    answer = reloaded.classify(["email me at jane@example.com"])[0]
    assert answer["intent"] in spec.labels and 0 < answer["probability"] <= 1


def test_a_model_saved_with_berts_unused_pooler_still_loads(one_layer_model: tuple, tmp_path: Path) -> None:
    """Models registered before the encoder was built without its pooler carry the pooler's weights."""
    model, spec, tokenizer = one_layer_model
    assert not any(name.startswith(POOLER) for name in model.state_dict())
    save_intent_model(model, spec, tokenizer, tmp_path / "older")
    weights = torch.load(tmp_path / "older" / WEIGHTS_FILE, weights_only=True)
    hidden = model.head.in_features
    pooler = {f"{POOLER}dense.weight": torch.ones(hidden, hidden), f"{POOLER}dense.bias": torch.ones(hidden)}
    torch.save({**weights, **pooler}, tmp_path / "older" / WEIGHTS_FILE)
    texts = ["I want a refund for <ORDER_ID>", "cancel it please"]
    assert torch.allclose(IntentModel.load(tmp_path / "older").probabilities(texts),
                          IntentModel(model, spec, tokenizer).probabilities(texts), atol=1e-5)


@pytest.mark.parametrize("f1, passed, says", [
    (0.95, True, "macro-F1 0.9500 is 0.1500 over the bag-of-words baseline's 0.8000 (at least 0.1 over it needed)"),
    (0.75, False, "macro-F1 0.7500 is 0.0500 under the bag-of-words baseline's 0.8000 (at least 0.1 over it needed)"),
])
def test_the_gate_wants_a_margin_over_the_baseline_and_says_which_side_of_it_the_model_is(
        f1: float, passed: bool, says: str, settings: KeelSettings) -> None:
    from keel.compress import VariantReport
    from keel.intents.config import IntentEvaluateConfig
    from keel.intents.evaluate import gate

    chosen = VariantReport(name="fine_tuned", accuracy=f1, f1_macro=f1, accuracy_drop=0.0, parameters=1,
                           nonzero_parameters=1, size_bytes=1, latency_p50_ms_batch1=1.0, latency_p50_ms_batch32=1.0)
    decision, _ = gate(chosen, {"f1_macro": 0.8}, IntentEvaluateConfig(), None, pd.DataFrame(), settings)
    assert decision.passed is passed and f"{'ok' if passed else 'FAIL'}: {says}" in decision.reasons
