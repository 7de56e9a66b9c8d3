"""The tracking database's schema, migrated once and safely with Alembic.

Every Tracker used to run `create_all` and `ALTER TABLE` on its first connection: two first
runs at once on PostgreSQL raced (DuplicateTable, DuplicateColumn). Now a Tracker reads the
recorded revision (one small SELECT; Alembic is not even imported) and migrates only when it
is behind, inside one transaction that first takes a lock, then checks the revision again:
PostgreSQL's transaction-scoped advisory lock, SQLite's write lock (`BEGIN IMMEDIATE`).
Whoever waited finds the work done. The revisions live in `migrations/versions/`; a
database made before Alembic is brought up to date by the baseline revision, rows kept.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text

HEAD = "0001"  # the newest revision in migrations/versions (a test keeps the two in step)
MIGRATIONS = Path(__file__).with_name("migrations")
# PostgreSQL advisory lock key for schema work: any fixed 64-bit number, unique to us.
LOCK_KEY = 0x62617463_68736372  # "batchscr"


class SchemaError(RuntimeError):
    """The database's schema is from a newer release than this code."""


def migrate(engine: Engine) -> None:
    """Bring the database's schema to HEAD, unless it is there already."""
    with engine.connect() as conn:
        if revision(conn) == HEAD:
            return
    if engine.dialect.name == "sqlite":
        _migrate_sqlite(engine)
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Held until this transaction ends: a second first use waits here, then finds
            # the revision recorded and does nothing.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        _upgrade(conn)


def revision(conn: Connection) -> str | None:
    """The revision the database records; None before its first migration."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _upgrade(conn: Connection) -> None:
    """Under the lock: check again, then run the revisions Alembic has not recorded."""
    found = revision(conn)
    if found == HEAD:
        return
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if found is not None and found not in known:
        raise SchemaError(
            f"the database's schema is at revision {found}, newer than this release knows "
            f"(up to {HEAD}): upgrade batchscore"
        )
    command.upgrade(config, "head")


def _migrate_sqlite(engine: Engine) -> None:
    """SQLite's own write lock stands in for the advisory lock: the migration's transaction
    starts with `BEGIN IMMEDIATE`, so a second process waits (its busy timeout) for the first
    to commit. pysqlite would otherwise begin transactions lazily, after the first read."""
    migrating = create_engine(engine.url)

    @event.listens_for(migrating, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(migrating, "begin")
    def _begin_immediate(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        with migrating.begin() as conn:
            _upgrade(conn)
    finally:
        migrating.dispose()
