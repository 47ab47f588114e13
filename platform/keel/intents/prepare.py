"""The data step of ``customer_service_intents``: utterances in, scrubbed and tokenized splits out.

Privacy comes first: texts are scrubbed and user ids pseudonymised in memory,
before anything is written, so the artifact store, MLflow and every later
stage only see placeholders. The manifest counts what was replaced, never the
values. Tokenization happens here too, so training reads token ids.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel import storage
from keel.data import tables
from keel.errors import DataError
from keel.intents.config import UtterancesConfig
from keel.intents.data import generate_utterances
from keel.intents.model import TOKENIZER_DIR, load_tokenizer, pretrained_dir, tokenize
from keel.intents.privacy import ScrubReport, pseudonymise, scrub
from keel.settings import KeelSettings

BUILTIN_SOURCE = "builtin://customer_service_utterances"
REQUIRED_COLUMNS = ("text", "intent")
SPLIT_FILES = {"train": "train.parquet", "val": "val.parquet", "test": "test.parquet"}
LABELS_FILE = "labels.json"
KEY_FILE = "pseudonym.key"


def read_utterances(source: str, config: UtterancesConfig, settings: KeelSettings) -> pd.DataFrame:
    """The builtin generator's utterances, or a user's file with ``text``, ``intent`` and optional columns
    (under the file's own names: ``config.columns``).

    Optional: ``user_id``, and ``split`` (``train``/``test``) to fix which rows are held out.
    """
    if source == BUILTIN_SOURCE:
        frame = generate_utterances(config.per_intent, config.typo_rate, config.seed)
        return frame.assign(split=np.where(frame["family"] == "held_out", "test", "train")).drop(columns="family")
    if source.startswith("builtin://"):
        raise DataError(f"{source}: no such bundled dataset; this pipeline knows {BUILTIN_SOURCE}.")
    return check_utterances(tables.read_table(source, settings, "utterances"), source, config)


def check_utterances(frame: pd.DataFrame, origin: str, config: UtterancesConfig) -> pd.DataFrame:
    """Text and intent present and non-empty; a ``split`` column, when given, only says train or test. Errors
    name the file's own column."""
    names = config.columns
    frame = names.select(frame, origin, "utterances.columns")
    for column in REQUIRED_COLUMNS:
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            raise DataError(f"{origin}: column {getattr(names, column)!r}: {int(empty.sum())} empty value(s), "
                            f"first at data row {int(np.flatnonzero(empty)[0]) + 1}.")
    frame = frame.astype({"text": "str", "intent": "str"})
    if "split" in frame.columns:
        unknown = sorted(set(frame["split"].astype(str)) - {"train", "test"})
        if unknown:
            raise DataError(f"{origin}: column {names.split!r}: unknown value(s) {unknown[:5]}; expected train or "
                            "test.")
    else:
        rng = np.random.default_rng(config.seed)
        frame = frame.assign(split=np.where(rng.random(len(frame)) < config.test_fraction, "test", "train"))
    if "user_id" not in frame.columns:
        frame = frame.assign(user_id="")
    return frame[["user_id", "text", "intent", "split"]]


def pseudonym_key(settings: KeelSettings) -> bytes:
    """``KEEL_PSEUDONYM_KEY``, or a random key created once under the local home (mode 0600)."""
    configured = settings.pseudonym_key.get_secret_value()
    if configured:
        return configured.encode()
    path = settings.home / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip().encode()


def protect(frame: pd.DataFrame, key: bytes) -> tuple[pd.DataFrame, ScrubReport]:
    """Placeholders for personal data in ``text``; keyed pseudonyms for ``user_id``."""
    report = ScrubReport()
    texts = frame["text"].map(lambda text: scrub(text, report))
    users = frame["user_id"].astype(str).map(lambda user: pseudonymise(user, key) if user else "")
    return frame.assign(text=texts, user_id=users), report


def split_frames(frame: pd.DataFrame, config: UtterancesConfig) -> dict[str, pd.DataFrame]:
    """Test rows as given; validation drawn per intent from the training rows (so it is in-distribution)."""
    train = frame[frame["split"] == "train"]
    val = train.groupby("intent", group_keys=False).sample(frac=config.validation_fraction, random_state=config.seed)
    return {"train": train.drop(index=val.index), "val": val, "test": frame[frame["split"] == "test"]}


def with_tokens(frame: pd.DataFrame, tokenizer: Any, labels: list[str], max_length: int) -> pd.DataFrame:
    """Token ids and attention masks, padded to ``max_length`` so the training batches are rectangular."""
    encoded = tokenize(tokenizer, frame["text"].tolist(), max_length, pad_to_max=True)
    index = {label: i for i, label in enumerate(labels)}
    return frame.drop(columns="split").assign(
        label=frame["intent"].map(index).astype("int64"),
        input_ids=list(encoded["input_ids"].numpy().astype(np.int32)),
        attention_mask=list(encoded["attention_mask"].numpy().astype(np.int8)))


def prepare_utterances(source: str, config: UtterancesConfig, output_uri: str, settings: KeelSettings) -> dict[str, Any]:
    """Read or generate, scrub, split and tokenize the utterances; publish the splits and the tokenizer."""
    frame, report = protect(read_utterances(source, config, settings), pseudonym_key(settings))
    splits = split_frames(frame, config)
    labels = sorted(frame["intent"].unique())
    if len(labels) < 2:
        raise DataError(f"{source}: column 'intent' has {len(labels)} distinct value(s); a classifier needs two.")
    counts = frame["intent"].value_counts()
    rare = counts[counts < config.min_per_intent]
    if not rare.empty:  # one example teaches nothing, and its test score is one row's luck
        raise DataError(f"{source}: intent(s) with fewer than {config.min_per_intent} utterances: "
                        + ", ".join(f"{intent!r} ({n})" for intent, n in sorted(rare.items())[:10])
                        + ". Add utterances, merge them into another intent or drop their rows; "
                          "utterances.min_per_intent sets the floor.")
    for name in ("train", "test"):
        if splits[name].empty:
            raise DataError(f"{source}: no {name} rows; set column 'split' or utterances.test_fraction.")
    if splits["val"].empty:  # early stopping would then compare losses of nothing and keep the first epoch
        raise DataError(f"{source}: no validation rows: utterances.validation_fraction "
                        f"({config.validation_fraction}) of each intent's training rows rounds to none; raise it "
                        "or add rows (at least 5 per intent at 0.1).")
    unseen = sorted(set(splits["test"]["intent"]) - set(splits["train"]["intent"]))
    if unseen:
        raise DataError(f"{source}: intent(s) {unseen} appear only in the test rows; nothing could learn them.")
    tokenizer = load_tokenizer(pretrained_dir())
    with storage.staged_output(output_uri, "ingest", settings) as out:
        for name, part in splits.items():
            with_tokens(part, tokenizer, labels, config.max_length).to_parquet(out.path(SPLIT_FILES[name]), index=False)
        tokenizer.save_pretrained(str(out.path(TOKENIZER_DIR)))
        out.write_json(f"{TOKENIZER_DIR}/{storage.MANIFEST}", {"stage": "tokenizer"})  # readable on its own
        out.write_json(LABELS_FILE, labels)
        out.manifest.update(
            source=source, rows=len(frame), labels=labels, max_length=config.max_length,
            splits={name: out.uri_of(file) for name, file in SPLIT_FILES.items()},
            tokenizer=out.uri_of(TOKENIZER_DIR), split_rows={name: len(part) for name, part in splits.items()},
            replaced=dict(report.replaced),
            summary=(f"{len(frame)} utterances, {len(labels)} intents; personal data replaced: "
                     + ", ".join(f"{n} {kind}" for kind, n in sorted(report.replaced.items()))),
        )
    return out.manifest


def read_splits(splits_uri: str, names: tuple[str, ...], settings: KeelSettings) -> list[pd.DataFrame]:
    """The named splits of a published preprocess output, in the order asked."""
    manifest = storage.read_manifest(splits_uri, settings)
    return [storage.read_parquet(manifest["splits"][name], settings) for name in names]


def tokenizer_of(splits_manifest: dict[str, Any], scratch: Path, settings: KeelSettings) -> Any:
    """The tokenizer the splits were tokenized with (saved beside them by :func:`prepare_utterances`)."""
    return load_tokenizer(storage.download_directory(splits_manifest["tokenizer"], scratch / TOKENIZER_DIR, settings))
