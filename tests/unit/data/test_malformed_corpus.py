"""Every file of the malformed corpus is rejected by ingest or validate with an error naming the file
and (where there is one) the column, and nothing of the failing stage is published."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel import storage
from keel.data.contract import parse_contract
from keel.data.ingest import ingest
from keel.data.validate import validate
from keel.errors import DataError
from keel.settings import KeelSettings
from tests.conftest import artifact_files
from tests.corpus.malformed import CASES, CONTRACT, DIRECTORY, Case, good_frame


def test_the_corpus_is_large_covers_three_formats_and_matches_its_generator() -> None:
    assert len(CASES) >= 50 and len({c.name for c in CASES}) == len(CASES)
    for suffix in (".csv", ".parquet", ".jsonl"):
        assert sum(c.name.endswith(suffix) for c in CASES) >= 10
    stale = [c.name for c in CASES if (DIRECTORY / c.name).read_bytes() != c.make()]
    assert not stale, f"rerun `python -m tests.corpus.malformed`: {stale}"


def test_the_base_table_passes(settings: KeelSettings, tmp_path: Path) -> None:
    path = tmp_path / "good.csv"
    good_frame().to_csv(path, index=False)
    ingest(str(path), storage.stage_uri(settings, "good", "ingest"), settings)
    report = validate(storage.stage_uri(settings, "good", "ingest"), parse_contract(CONTRACT, "corpus"),
                      storage.stage_uri(settings, "good", "validate"), settings)
    assert report["passed"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_file_is_rejected_by_name(case: Case, settings: KeelSettings) -> None:
    source = str(DIRECTORY / case.name)
    ingested, validated = (storage.stage_uri(settings, "bad", stage) for stage in ("ingest", "validate"))
    with pytest.raises(DataError) as raised:
        ingest(source, ingested, settings)
        validate(ingested, parse_contract(CONTRACT, "corpus"), validated, settings)
    message = raised.value.headline
    assert case.name in message
    for fragment in case.expect:
        assert fragment in message, message[:500]
    published = artifact_files(settings)
    assert not any("/validate/" in path for path in published)  # the failing stage left nothing
    assert all(path.startswith("runs/bad/ingest/") for path in published)  # ...only a complete earlier stage
