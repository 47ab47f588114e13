import re
from pathlib import Path

import pytest

from keel import storage
from keel.errors import StorageError
from keel.settings import KeelSettings


@pytest.mark.parametrize("uri, scheme", [("data/x.csv", "file"), ("file:///tmp/x.csv", "file"),
                                         ("s3://bucket/key.csv", "s3"), ("https://host/x.csv", "https")])
def test_parse_known_schemes(uri: str, scheme: str) -> None:
    assert storage.parse(uri).scheme == scheme


def test_parse_rejects_unknown_scheme_and_says_what_works() -> None:
    with pytest.raises(StorageError, match=r"gs://b/x.csv: unknown URI scheme 'gs'.*s3://"):
        storage.parse("gs://b/x.csv")


def test_parse_rejects_s3_without_bucket() -> None:
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.parse("s3:///key")


def test_write_then_read_roundtrip(tmp_path: Path, settings: KeelSettings) -> None:
    uri = str(tmp_path / "a" / "b.json")
    storage.write_json(uri, {"x": 1}, settings)
    assert storage.read_json(uri, settings) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temp file left


def test_missing_file_is_named(tmp_path: Path, settings: KeelSettings) -> None:
    with pytest.raises(StorageError, match="nope.csv: no such file"):
        storage.read_bytes(str(tmp_path / "nope.csv"), settings)


def test_unreachable_url_is_named(settings: KeelSettings) -> None:
    with pytest.raises(StorageError, match=r"http://127.0.0.1:9/x.csv: cannot download"):
        storage.read_bytes("http://127.0.0.1:9/x.csv", settings)


def test_staged_output_publishes_whole_on_success(tmp_path: Path, settings: KeelSettings) -> None:
    target = str(tmp_path / "run" / "stage")
    with storage.staged_output(target, "stage", settings) as out:
        out.write_json("result.json", {"ok": True})
        out.manifest["rows"] = 3
        assert not Path(target).exists()  # nothing visible before the block ends
    manifest = storage.read_manifest(target, settings)
    assert manifest["rows"] == 3 and manifest["stage"] == "stage" and manifest["duration_s"] >= 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["stage"]


def test_staged_output_leaves_nothing_on_failure(tmp_path: Path, settings: KeelSettings) -> None:
    target = tmp_path / "run" / "stage"
    with pytest.raises(RuntimeError), storage.staged_output(str(target), "stage", settings) as out:
        out.write_json("half.json", {})
        raise RuntimeError("stage died")
    assert not target.exists()
    assert list((tmp_path / "run").iterdir()) == []


def test_a_stage_killed_mid_write_publishes_nothing_and_its_retry_cleans_up(tmp_path: Path,
                                                                            settings: KeelSettings) -> None:
    import signal
    import subprocess
    import sys
    import time

    target, ready = tmp_path / "run" / "train", tmp_path / "ready"
    script = (f"from keel import storage\nfrom keel.settings import KeelSettings\nimport pathlib, time\n"
              f"with storage.staged_output({str(target)!r}, 'train', KeelSettings(home={str(tmp_path)!r})) as out:\n"
              f"    out.write_json('weights.json', {{'half': True}})\n"
              f"    pathlib.Path({str(ready)!r}).touch()\n"
              f"    time.sleep(60)\n")
    stage = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stage.send_signal(signal.SIGKILL)
    stage.wait(timeout=10)
    assert ready.exists() and not target.exists()  # killed mid-write: nothing at the stage's path
    assert [p.name.startswith(f".train.train-{stage.pid}-") for p in (tmp_path / "run").iterdir()] == [True]
    with pytest.raises(StorageError):
        storage.read_manifest(str(target), settings)
    with storage.staged_output(str(target), "train", settings) as out:  # the step's retry
        out.write_json("weights.json", {"half": False})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train"]
    assert storage.read_json(storage.join(str(target), "weights.json"), settings) == {"half": False}


def test_writers_into_one_folder_leave_each_other_alone(tmp_path: Path, settings: KeelSettings) -> None:
    """Two `keel predict` runs writing beside each other: the second's clean-up of abandoned attempts must not
    take the first's files while it still writes them."""
    with storage.staged_output(str(tmp_path / "a"), "predict", settings) as first:
        first.write_json("scores.json", {"by": "a"})
        with storage.staged_output(str(tmp_path / "b"), "predict", settings) as second:
            second.write_json("scores.json", {"by": "b"})
        first.write_json("rows.json", {"n": 1})
    for name in ("a", "b"):
        assert storage.read_json(storage.join(str(tmp_path / name), "scores.json"), settings) == {"by": name}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_an_attempt_still_writing_in_another_process_is_left_alone(tmp_path: Path, settings: KeelSettings) -> None:
    import subprocess
    import sys

    target = tmp_path / "scored"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".scored.predict-{writer.pid}-x1"
        alive.mkdir()
        with storage.staged_output(str(target), "predict", settings) as out:
            out.write_json("scores.json", {})
        assert alive.is_dir()
    finally:
        writer.kill()
        writer.wait(timeout=10)
    with storage.staged_output(str(target), "predict", settings) as out:  # its writer is gone now
        out.write_json("scores.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored"]


def test_republishing_replaces_an_earlier_attempt(tmp_path: Path, settings: KeelSettings) -> None:
    target = str(tmp_path / "stage")
    for attempt in ("first", "second"):
        with storage.staged_output(target, "stage", settings) as out:
            out.write_json(f"{attempt}.json", {})
    assert sorted(p.name for p in Path(target).iterdir()) == ["manifest.json", "second.json"]


def test_run_ids_cannot_escape_the_runs_folder(settings: KeelSettings) -> None:
    with pytest.raises(StorageError, match="cannot be used in a path"):
        storage.run_uri(settings, "../other")


def test_parts_written_elsewhere_are_removed_on_failure_without_hiding_why_it_failed(
        monkeypatch: pytest.MonkeyPatch, settings: KeelSettings) -> None:
    from keel.errors import DataError

    removals: list[str] = []

    def remove(loc: storage.Location, _: KeelSettings) -> None:
        removals.append(loc.uri)
        if len(removals) > 1:  # S3 goes away while the step fails
            raise StorageError(f"{loc.uri}: cannot remove the earlier output (ConnectionError)")

    monkeypatch.setattr(storage, "_remove_s3_output", remove)
    with pytest.raises(DataError, match="the row with id=7"), \
            storage.staged_for_other_writers("s3://bucket/scored", "predict", settings) as out:
        assert out.target("predictions") == "s3://bucket/scored/predictions"  # the workers write to S3 itself
        raise DataError("the row with id=7: not a number")
    assert removals == ["s3://bucket/scored"] * 2  # before the writers, and after they failed (only logged)


def test_a_user_named_destination_is_replaced_only_when_it_holds_nothing_but_an_earlier_output(
        tmp_path: Path, settings: KeelSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`keel predict M rows.csv .` deleted the current directory's files, and `... out` those of an existing
    `out/`: an output is published by replacing its destination whole."""
    from keel.cli.output import refuse_to_replace
    from keel.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("a\n1\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for destination, says in ((".", "is the current directory or holds it"), ("..", "is the current directory"),
                              ("rows.csv", "holds files that are not an earlier Keel output"),
                              ("mine", "holds files that are not an earlier Keel output")):
        with pytest.raises(ConfigError, match=f"^{re.escape(destination)}: {says}"):
            refuse_to_replace(destination, True, settings)
    (tmp_path / "empty").mkdir()
    refuse_to_replace("empty", False, settings)
    refuse_to_replace("new", False, settings)
    with storage.staged_output(str(tmp_path / "out"), "predict", settings) as out:
        out.write_json("predictions/part-0.json", {})
        out.write_json("summary.json", {})
    assert storage.read_manifest(str(tmp_path / "out"), settings)[storage.WRITTEN] == ["predictions", "summary.json"]
    with pytest.raises(ConfigError, match="holds an earlier output; pass --force"):
        refuse_to_replace("out", False, settings)
    refuse_to_replace("out", True, settings)
    (tmp_path / "out" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="^out: holds mine.txt, which its earlier output did not write"):
        refuse_to_replace("out", True, settings)
    assert (tmp_path / "rows.csv").read_text() == "a\n1\n" and (tmp_path / "mine" / "notes.txt").exists()
