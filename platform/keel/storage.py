"""Read and write artifacts by URI: local paths, ``s3://`` (any S3 API) and ``http(s)://``.

Stages never half-write. Each writes its outputs into a private staging
directory and publishes it in one step: a rename on a local disk, or an upload
whose ``manifest.json`` goes last on S3. A reader that finds the manifest
finds a complete output; one that does not, finds nothing it could misread.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from keel.errors import StorageError
from keel.settings import KeelSettings

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow.fs
    from minio import Minio

MANIFEST = "manifest.json"
WRITTEN = "written"  # manifest key: the top-level entries the output wrote
# When a component runs a stage, its clock starts as the component body starts,
# so the libraries a stage has to load count as the stage's own time.
STAGE_STARTED_AT: ContextVar[float | None] = ContextVar("keel_stage_started_at", default=None)
HTTP_TIMEOUT_S = 60
ENDPOINT_CHECK_TIMEOUT_S = 5.0  # for an endpoint to answer at all
SCHEMES = ("file", "s3", "http", "https")


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` plus ``bucket``/``key`` for S3, ``path`` otherwise."""

    uri: str
    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""


def parse(uri: str) -> Location:
    """Split a URI, treating a bare path as a local file."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and uri[1:3] == ":\\"):
        return Location(uri, "file", path=str(Path(uri).expanduser().resolve()))
    if scheme == "file":
        return Location(uri, "file", path=parsed.path)
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket, as in s3://bucket/key.")
        return Location(uri, "s3", bucket=parsed.netloc, key=parsed.path.lstrip("/"))
    if scheme in ("http", "https"):
        return Location(uri, scheme, path=uri)
    raise StorageError(
        f"{uri}: unknown URI scheme {scheme!r}. Use a local path, file://, s3:// or http(s)://."
    )


def join(uri: str, *parts: str) -> str:
    """Append path segments to a URI without doubling slashes."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def filename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def minio_client(settings: KeelSettings) -> Minio:
    """A MinIO SDK client for the configured endpoint (AWS S3 when none is set)."""
    from minio import Minio

    endpoint = urlparse(settings.s3_endpoint) if settings.s3_endpoint else None
    return Minio(
        endpoint.netloc if endpoint else "s3.amazonaws.com",
        access_key=settings.s3_access_key.get_secret_value() or None,
        secret_key=settings.s3_secret_key.get_secret_value() or None,
        secure=endpoint.scheme == "https" if endpoint else True,
        region=settings.s3_region,
    )


def pyarrow_filesystem(uri: str, settings: KeelSettings) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and path for ``uri``: what Ray Data and Ray Train storage take."""
    from pyarrow import fs

    loc = parse(uri)
    if loc.scheme == "file":
        return fs.LocalFileSystem(), loc.path
    if loc.scheme == "s3":
        endpoint = urlparse(settings.s3_endpoint) if settings.s3_endpoint else None
        s3 = fs.S3FileSystem(
            access_key=settings.s3_access_key.get_secret_value() or None,
            secret_key=settings.s3_secret_key.get_secret_value() or None,
            region=settings.s3_region,
            endpoint_override=endpoint.netloc if endpoint else None,
            scheme=endpoint.scheme if endpoint else "https",
        )
        return s3, f"{loc.bucket}/{loc.key}"
    raise StorageError(f"{uri}: only local and s3:// locations can be used as a filesystem.")


def no_answer(url: str, timeout_s: float) -> str | None:
    """Why ``url`` got no HTTP answer at all (refused, no such host, a timeout), or None when it answered.

    Any HTTP answer counts, an error status included, and so does a TLS handshake this check cannot vouch for
    (the client that talks to the server may trust other certificates): what the server says is its client's to
    judge. Clients retry a refused connection with backoff, for seconds (MinIO's) or minutes (MLflow's), and
    then fail deep inside a step; this check fails first, by name.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - the user's own endpoint
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        return None if isinstance(e.reason, ssl.SSLError) else str(e.reason)
    except (OSError, ValueError) as e:  # a timeout, a reset, a malformed URL
        return str(e)


def check_s3_endpoint(settings: KeelSettings, timeout_s: float = ENDPOINT_CHECK_TIMEOUT_S) -> None:
    """An s3:// artifact root on an endpoint that does not answer fails here, naming it (no endpoint: AWS's)."""
    if not settings.artifact_root.startswith("s3://") or not settings.s3_endpoint:
        return
    reason = no_answer(settings.s3_endpoint, timeout_s)
    if reason is not None:
        raise StorageError(f"cannot reach the S3 endpoint {settings.s3_endpoint} of the artifact root "
                           f"{settings.artifact_root} ({reason}). Start it, or point KEEL_S3_ENDPOINT at one that "
                           "answers (unset KEEL_ARTIFACT_ROOT, artifacts stay under KEEL_HOME).")


def _s3_error(uri: str, action: str, e: Exception) -> StorageError:
    return StorageError(f"{uri}: cannot {action} ({type(e).__name__}: {e}). Check the URI, "
                        "KEEL_S3_ENDPOINT and the S3 credentials.")


def read_bytes(uri: str, settings: KeelSettings) -> bytes:
    """The whole object at ``uri``; a StorageError naming it if it cannot be read."""
    loc = parse(uri)
    if loc.scheme == "file":
        try:
            return Path(loc.path).read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"{uri}: no such file.") from e
        except OSError as e:
            raise StorageError(f"{uri}: cannot read ({e.strerror}).") from e
    if loc.scheme == "s3":
        try:
            response = minio_client(settings).get_object(loc.bucket, loc.key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        except Exception as e:
            raise _s3_error(uri, "read the object", e) from e
    try:
        with urllib.request.urlopen(loc.path, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
            return bytes(response.read())
    except urllib.error.HTTPError as e:
        raise StorageError(f"{uri}: the server answered HTTP {e.code} {e.reason}.") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StorageError(f"{uri}: cannot download ({reason}). Check the URL and the network.") from e


def read_json(uri: str, settings: KeelSettings) -> Any:
    try:
        return json.loads(read_bytes(uri, settings))
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri}: not valid JSON ({e}).") from e


def exists(uri: str, settings: KeelSettings) -> bool:
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.path).exists()
    if loc.scheme == "s3":
        from minio.error import S3Error

        try:
            minio_client(settings).stat_object(loc.bucket, loc.key)
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                return False
            raise _s3_error(uri, "check the object", e) from e
        except Exception as e:  # an endpoint that does not answer: urllib3's MaxRetryError, a timeout
            raise _s3_error(uri, "check the object", e) from e
    raise StorageError(f"{uri}: existence checks need a local or s3:// URI.")


def list_children(uri: str, settings: KeelSettings) -> list[str]:
    """Names directly under a directory-like URI (empty when it does not exist)."""
    loc = parse(uri)
    if loc.scheme == "file":
        root = Path(loc.path)
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if loc.scheme == "s3":
        prefix = loc.key.rstrip("/") + "/" if loc.key.strip("/") else ""  # "": the bucket's top level
        try:
            objects = minio_client(settings).list_objects(loc.bucket, prefix=prefix)
            names = {o.object_name[len(prefix):].strip("/") for o in objects}
            return sorted(names - {""})  # "" is the directory marker pyarrow's S3 writers (Ray Data's) leave
        except Exception as e:
            raise _s3_error(uri, "list the prefix", e) from e
    raise StorageError(f"{uri}: listing needs a local or s3:// URI.")


def holds_anything(uri: str, settings: KeelSettings) -> bool:
    """Whether ``uri`` names a file, a non-empty directory, or an S3 prefix with objects under it."""
    loc = parse(uri)
    if loc.scheme == "file":
        path = Path(loc.path)
        return path.is_dir() and any(path.iterdir()) or (path.exists() and not path.is_dir())
    return bool(list_children(uri, settings))


def download(uri: str, dest: Path, settings: KeelSettings) -> Path:
    """Copy one object to a local file, streaming, so large inputs need no memory."""
    loc = parse(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if loc.scheme == "file":
        if not Path(loc.path).is_file():
            raise StorageError(f"{uri}: no such file.")
        shutil.copyfile(loc.path, dest)
    elif loc.scheme == "s3":
        try:
            minio_client(settings).fget_object(loc.bucket, loc.key, str(dest))
        except Exception as e:
            raise _s3_error(uri, "download the object", e) from e
    else:
        dest.write_bytes(read_bytes(uri, settings))
    return dest


def download_directory(uri: str, dest: Path, settings: KeelSettings) -> Path:
    """Copy a published output (a directory of files) to a local directory."""
    loc = parse(uri)
    if loc.scheme == "file":
        if not (Path(loc.path) / MANIFEST).exists():
            raise StorageError(f"{uri}: no published output here (no {MANIFEST}).")
        shutil.copytree(loc.path, dest, dirs_exist_ok=True)
        return dest
    if loc.scheme != "s3":
        raise StorageError(f"{uri}: directories can only be read from local or s3:// locations.")
    prefix = loc.key.rstrip("/") + "/"
    client = minio_client(settings)
    try:
        for obj in client.list_objects(loc.bucket, prefix=prefix, recursive=True):
            target = dest / obj.object_name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.fget_object(loc.bucket, obj.object_name, str(target))
    except Exception as e:
        raise _s3_error(uri, "download the directory", e) from e
    if not (dest / MANIFEST).exists():
        raise StorageError(f"{uri}: no published output here (no {MANIFEST}).")
    return dest


def is_directory(uri: str) -> bool:
    """Whether ``uri`` names a directory or ``s3://`` prefix of part files rather than one file: a local
    directory, or an S3 key that ends in ``/`` or has no file extension (Spark's and Ray Data's outputs)."""
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.path).is_dir()
    return loc.scheme == "s3" and (uri.endswith("/") or "." not in filename(uri))


def list_files(uri: str, settings: KeelSettings) -> tuple[list[str], Any]:
    """Every file under a directory or prefix (relative names, sorted), and how to copy one to a local path:
    a listing first, so a caller can refuse what it holds before copying anything."""
    loc = parse(uri)
    if loc.scheme == "file":
        root = Path(loc.path)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return names, lambda name, target: shutil.copyfile(root / name, target)
    if loc.scheme != "s3":
        raise StorageError(f"{uri}: a directory of part files needs a local or s3:// location.")
    prefix, client = loc.key.rstrip("/") + "/" if loc.key.strip("/") else "", minio_client(settings)
    try:
        names = sorted(o.object_name[len(prefix):] for o in client.list_objects(loc.bucket, prefix=prefix,
                                                                                 recursive=True)
                       if not o.is_dir and o.object_name != prefix)
    except Exception as e:
        raise _s3_error(uri, "list the prefix", e) from e

    def fetch(name: str, target: Path) -> None:
        try:
            client.fget_object(loc.bucket, prefix + name, str(target))
        except Exception as e:
            raise _s3_error(f"s3://{loc.bucket}/{prefix}{name}", "download the object", e) from e

    return names, fetch


def write_bytes(uri: str, data: bytes, settings: KeelSettings) -> None:
    """Write one object atomically: readers see the old content or the new, never a part."""
    loc = parse(uri)
    if loc.scheme == "file":
        target = Path(loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    if loc.scheme == "s3":
        import io

        try:  # a single PUT: S3 makes the object visible only once it is complete
            minio_client(settings).put_object(loc.bucket, loc.key, io.BytesIO(data), len(data))
        except Exception as e:
            raise _s3_error(uri, "write the object", e) from e
        return
    raise StorageError(f"{uri}: cannot write to {loc.scheme}:// locations; use a path or s3://.")


def write_json(uri: str, payload: Any, settings: KeelSettings) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode(), settings)


def publish_directory(local_dir: Path, uri: str, settings: KeelSettings) -> None:
    """Make ``local_dir`` appear at ``uri`` whole, replacing any earlier attempt's output."""
    loc = parse(uri)
    if loc.scheme == "file":
        _publish_local(local_dir, Path(loc.path))
    elif loc.scheme == "s3":
        _publish_s3(local_dir, loc, settings)
    else:
        raise StorageError(f"{uri}: outputs can only be published to a path or s3://.")


def _publish_local(local_dir: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
    if target.exists():  # a retry: move the earlier attempt aside, then swap in
        target.rename(stale)
    local_dir.rename(target)
    shutil.rmtree(stale, ignore_errors=True)


def _remove_s3_output(loc: Location, settings: KeelSettings) -> None:
    """Every object under the output's prefix, its manifest first: the old output stops counting at once."""
    client = minio_client(settings)
    prefix = loc.key.rstrip("/")
    try:
        stale = [o.object_name for o in client.list_objects(loc.bucket, prefix=prefix + "/", recursive=True)]
        for name in sorted(stale, key=lambda n: n.endswith(MANIFEST), reverse=True):
            client.remove_object(loc.bucket, name)
    except Exception as e:
        raise _s3_error(loc.uri, "remove the earlier output", e) from e


def _publish_s3(local_dir: Path, loc: Location, settings: KeelSettings) -> None:
    client = minio_client(settings)
    prefix = loc.key.rstrip("/")
    _remove_s3_output(loc, settings)
    try:
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == MANIFEST):  # manifest last
            client.fput_object(loc.bucket, f"{prefix}/{path.relative_to(local_dir).as_posix()}", str(path))
    except Exception as e:
        raise _s3_error(loc.uri, "publish the output", e) from e


@dataclass
class StagedOutput:
    """A stage's private working directory and the manifest it will publish."""

    dir: Path
    uri: str
    manifest: dict[str, Any] = field(default_factory=dict)
    in_place: bool = False  # other processes write straight to the output's URI (S3 only)

    def path(self, name: str) -> Path:
        target = self.dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def target(self, name: str) -> str:
        """Where a writer other than this process (a Ray Data worker) writes ``name``."""
        return self.uri_of(name) if self.in_place else str(self.path(name))

    def uri_of(self, name: str) -> str:
        return join(self.uri, name)

    def write_json(self, name: str, payload: Any) -> Path:
        target = self.path(name)
        target.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        return target


@contextmanager
def staged_output(uri: str, stage: str, settings: KeelSettings) -> Iterator[StagedOutput]:
    """Collect a stage's files privately; publish them at ``uri`` only if the block succeeds.

    The manifest records the stage's own compute time, which the run summary
    and the pipeline benchmark read back.
    """
    loc = parse(uri)
    if loc.scheme == "file":  # stage beside the target so the final rename is atomic
        target = Path(loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(target, stage)
        staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(target, stage)}{os.getpid()}-", dir=target.parent))
    else:
        staging = Path(tempfile.mkdtemp(prefix=f"keel-{stage}-"))
    started = STAGE_STARTED_AT.get() or time.time()
    output = StagedOutput(dir=staging, uri=uri, manifest={"stage": stage})
    try:
        yield output
        _finish_manifest(output, started, [p.name for p in staging.iterdir()])
        publish_directory(staging, uri, settings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_prefix(target: Path, stage: str) -> str:
    return f".{target.name}.{stage}-"


def _remove_abandoned_staging(target: Path, stage: str) -> None:
    """Remove what an earlier attempt at ``target`` left when it was killed mid-write (a step's retry). The
    staging directory names its writer's process: one still alive is writing beside us, e.g. a second `keel
    predict` into the same folder, and its files are its own. Our own process id is no writer: a retry in a
    fresh container can be given the id its killed attempt had."""
    prefix = _staging_prefix(target, stage)
    for staging in target.parent.glob(f"{glob.escape(prefix)}*"):
        writer = staging.name[len(prefix):].split("-", 1)[0]
        if not writer.isdigit() or int(writer) == os.getpid() or not _process_alive(int(writer)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _finish_manifest(output: StagedOutput, started: float, written: list[str]) -> Path:
    """``written``: the output's top-level entries, so a later command asked to replace it can tell them from
    files someone else put beside them (see :func:`foreign_entries`)."""
    output.manifest["started_at"] = started
    output.manifest["duration_s"] = round(time.time() - started, 4)
    output.manifest[WRITTEN] = sorted(set(written) - {MANIFEST})
    return output.write_json(MANIFEST, output.manifest)


def foreign_entries(uri: str, settings: KeelSettings) -> list[str]:
    """What the output directory at ``uri`` holds that its manifest does not say it wrote (everything, for an
    output from before manifests listed their entries)."""
    written = set(read_manifest(uri, settings).get(WRITTEN, [])) | {MANIFEST}
    return sorted(set(list_children(uri, settings)) - written)


@contextmanager
def staged_for_other_writers(uri: str, stage: str, settings: KeelSettings) -> Iterator[StagedOutput]:
    """:func:`staged_output` for files that other processes write (Ray Data's workers), at ``output.target(name)``.

    Locally that is the private staging directory, published by rename as usual. On S3 it is the output's own
    prefix: workers on other nodes cannot reach a directory on this machine, and copying every part afterwards
    would write the output twice. The prefix is emptied first, the manifest (what marks an output complete) is
    written last, and whatever the writers wrote is removed if the block fails.
    """
    loc = parse(uri)
    if loc.scheme != "s3":
        with staged_output(uri, stage, settings) as output:
            yield output
        return
    output = StagedOutput(dir=Path(tempfile.mkdtemp(prefix=f"keel-{stage}-")), uri=uri, manifest={"stage": stage},
                          in_place=True)
    started = STAGE_STARTED_AT.get() or time.time()
    _remove_s3_output(loc, settings)
    try:
        yield output
        manifest = _finish_manifest(output, started, list_children(uri, settings))
        write_bytes(join(uri, MANIFEST), manifest.read_bytes(), settings)
    except BaseException:
        try:
            _remove_s3_output(loc, settings)
        except StorageError as cleanup:  # the writers' failure is the one to report; no manifest marks the rest
            logging.getLogger(__name__).warning("%s", cleanup)
        raise
    finally:
        shutil.rmtree(output.dir, ignore_errors=True)


def read_manifest(uri: str, settings: KeelSettings) -> dict[str, Any]:
    """The manifest of a published stage output; a StorageError if it is incomplete or absent."""
    manifest = read_json(join(uri, MANIFEST), settings)
    if not isinstance(manifest, dict):
        raise StorageError(f"{join(uri, MANIFEST)}: expected a JSON object.")
    return manifest


def read_parquet(uri: str, settings: KeelSettings) -> pd.DataFrame:
    """A Parquet file at ``uri`` as a DataFrame; a StorageError naming it when unreadable."""
    import pyarrow.parquet as pq

    filesystem, path = pyarrow_filesystem(uri, settings)
    try:
        return pq.read_table(path, filesystem=filesystem).to_pandas()
    except (OSError, ValueError) as e:
        raise StorageError(f"{uri}: cannot read Parquet ({e}).") from e


def run_uri(settings: KeelSettings, run_id: str) -> str:
    """Where one pipeline run keeps its outputs: runs never share an artifact path."""
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise StorageError(f"run id {run_id!r} cannot be used in a path; expected a plain name.")
    return join(settings.artifact_root, "runs", run_id)


def stage_uri(settings: KeelSettings, run_id: str, stage: str) -> str:
    return join(run_uri(settings, run_id), stage)
