"""Migrate MLflow's backend store once, however many tracking-server pods start at the same moment.

Each MLflow pod the chart runs migrates the store in an init container before its server starts, so that
`helm upgrade` to a release with a newer MLflow is one command. With ``mlflow.replicas`` above 1 the pods
start together, and two ``mlflow db upgrade`` runs on one fresh PostgreSQL database fail on each other's
tables ("duplicate key value violates unique constraint pg_type_typname_nsp_index"): the losers' init
containers exit 1 and the kubelet restarts them, and a migration between MLflow versions can stop halfway.
A PostgreSQL advisory lock held for the whole migration lets one pod migrate while the others wait, then
find nothing left to do. The migrations themselves stay MLflow's own commands.

Usage (the chart's init container): ``python -m keel.tracking_store BACKEND_STORE_URI [--auth]``
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from keel.errors import KeelError

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

# pg_advisory_lock takes a bigint; hashtext() turns this name into one, the same in every pod.
MIGRATION_LOCK = "keel.mlflow-store-migration"
CONNECT_TIMEOUT_S = 300.0  # the chart's PostgreSQL may still be starting when the MLflow pods do
# Answers from a running server that waiting will not change (PostgreSQL listens on TCP only once it is initialized).
FINAL_REFUSALS = ("password authentication failed", "no password supplied", "does not exist")


class TrackingStoreError(KeelError):
    """MLflow's backend store could not be reached or migrated."""


def migration_commands(backend_store_uri: str, auth: bool) -> dict[str, list[str]]:
    """MLflow's own migrations by name: the tracking store's, then the basic-auth app's tables in the same database.

    The auth app would otherwise migrate its tables as each server starts, outside the lock.
    """
    commands = {"mlflow db upgrade": [str(Path(sys.executable).with_name("mlflow")), "db", "upgrade", backend_store_uri]}
    if auth:
        commands["mlflow.server.auth db upgrade"] = [sys.executable, "-m", "mlflow.server.auth", "db", "upgrade",
                                                     "--url", backend_store_uri]
    return commands


def upgrade(backend_store_uri: str, auth: bool = False, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Bring the store (and the auth app's tables, with ``auth``) to this MLflow's schema; a no-op when current."""
    with migration_lock(backend_store_uri, connect_timeout_s):
        for name, command in migration_commands(backend_store_uri, auth).items():
            if subprocess.run(command, check=False).returncode != 0:
                raise TrackingStoreError(
                    f"`{name}` failed (its output is above). The store is as the failed migration left it: restore "
                    "the backup MLflow advises taking before an upgrade, or fix the cause and restart the pod to run "
                    "it again.")


@contextlib.contextmanager
def migration_lock(backend_store_uri: str, connect_timeout_s: float) -> Iterator[None]:
    """Hold PostgreSQL's advisory lock for the migration; other stores are not shared by concurrent pods here."""
    if not backend_store_uri.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(backend_store_uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with connect(engine, connect_timeout_s) as connection:
            lock = {"name": MIGRATION_LOCK}
            if not connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(hashtext(:name))"), lock).scalar():
                print(f"another MLflow pod is migrating the store: waiting for its lock '{MIGRATION_LOCK}'", flush=True)
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:name))"), lock)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:name))"), lock)
    finally:
        engine.dispose()


@contextlib.contextmanager
def connect(engine: Engine, timeout_s: float) -> Iterator[Connection]:
    """A connection in autocommit (the lock is the session's, not a transaction's), retried while the server starts."""
    import sqlalchemy

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            break
        except sqlalchemy.exc.OperationalError as e:
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            refused = any(answer in reason for answer in FINAL_REFUSALS)
            if refused or time.monotonic() >= deadline:
                waited = "" if refused else f" within {timeout_s:.0f} s"
                raise TrackingStoreError(
                    f"cannot reach MLflow's backend store {engine.url.render_as_string()}{waited}: {reason}. Check the "
                    "PostgreSQL host, port and database (postgresql.*) and PGPASSWORD (the credentials Secret).") from e
            print(f"waiting for PostgreSQL at {engine.url.host}:{engine.url.port}: {reason}", flush=True)
            time.sleep(2)
    with connection:
        yield connection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keel.tracking_store", description=__doc__.splitlines()[0])
    parser.add_argument("backend_store_uri", help="the URI `mlflow server --backend-store-uri` opens")
    parser.add_argument("--auth", action="store_true", help="also migrate the basic-auth app's tables there")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, metavar="SECONDS",
                        help="how long to wait for PostgreSQL to accept connections")
    args = parser.parse_args(argv)
    try:
        upgrade(args.backend_store_uri, auth=args.auth, connect_timeout_s=args.connect_timeout)
    except KeelError as e:
        print(f"error: {e.headline}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
