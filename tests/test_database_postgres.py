"""The cluster's PostgreSQL database against the embedded SQLite one, on a real PostgreSQL
server started by the tests: one schema for both (a test that fails when they differ), the
instance store's C-STORE path, reconnection after a restart, read-only readers, and the
migration of an embedded node's history."""

from __future__ import annotations

import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.config import load_config
from dicom_node.database import (
    SCHEMA_VERSION,
    SqliteDatabase,
    database_path,
    open_reader,
    schema_version,
)
from dicom_node.database_postgres import PostgresDatabase, migrate_from_sqlite, translate_sql
from dicom_node.errors import OutOfResources
from dicom_node.phantoms import write_ct_series
from dicom_node.store import InstanceStore, Sender, StoredInstance, StoreResult
from tests.support.cases import PHANTOMS
from tests.support.dicomfiles import dataset_bytes
from tests.support.node import NodeProcess, plugin_env
from tests.support.postgres import PostgresServer, postgres_server, postgres_url

__all__ = ["postgres_server", "postgres_url"]  # the fixtures this module uses

pytestmark = pytest.mark.integration  # a PostgreSQL server process

SENDER = Sender("MODALITY", "127.0.0.1")
_TYPES = {"TEXT": "text", "REAL": "double precision", "INTEGER": "bigint"}


def _normal(expression: str | None) -> str | None:
    """A default or an index predicate without the spelling the engines differ in."""
    if expression is None:
        return None
    text = re.sub(r"::\w+", "", expression).replace("(", "").replace(")", "")
    return " ".join(text.lower().split())


def sqlite_schema(path: Path) -> dict[str, Any]:
    """Tables (columns in order with type, NOT NULL, default, identity) and indexes (name for
    created ones, columns, unique, predicate) of a live SQLite database."""
    conn = sqlite3.connect(path)
    try:
        tables: dict[str, Any] = {}
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        for table in names:
            sql = conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()[0]
            columns = [
                (
                    name,
                    _TYPES[kind],
                    bool(notnull or pk),  # a primary key is never NULL in PostgreSQL
                    _normal(default),
                    pk == 1 and "AUTOINCREMENT" in sql and kind == "INTEGER",
                )
                for _, name, kind, notnull, default, pk in conn.execute(
                    f"PRAGMA table_info({table})"
                )
            ]
            indexes = set()
            for _, index, unique, origin, partial in conn.execute(f"PRAGMA index_list({table})"):
                cols = tuple(r[2] for r in conn.execute(f"PRAGMA index_info({index})"))
                predicate = None
                if partial:
                    created = conn.execute(
                        "SELECT sql FROM sqlite_master WHERE name = ?", (index,)
                    ).fetchone()[0]
                    predicate = _normal(created.split(" WHERE ", 1)[1])
                indexes.add((index if origin == "c" else None, cols, bool(unique), predicate))
            keys = [c for c in conn.execute(f"PRAGMA table_info({table})") if c[5]]
            if len(keys) == 1 and keys[0][2] == "INTEGER":  # SQLite's rowid alias: no index
                indexes.add((None, (keys[0][1],), True, None))
            tables[table] = {"columns": columns, "indexes": indexes}
        return tables
    finally:
        conn.close()


def postgres_schema(url: str) -> dict[str, Any]:
    """The same description of a live PostgreSQL database (its schema_version table is the
    one thing only PostgreSQL has: SQLite keeps the version in PRAGMA user_version)."""
    import psycopg

    with psycopg.connect(url) as conn:
        tables: dict[str, Any] = {}
        names = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema() AND table_name != 'schema_version'"
                " ORDER BY table_name"
            )
        ]
        for table in names:
            columns = [
                (name, kind, nullable == "NO", _normal(default), identity == "YES")
                for name, kind, nullable, default, identity in conn.execute(
                    "SELECT column_name, data_type, is_nullable, column_default, is_identity"
                    " FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = %s"
                    " ORDER BY ordinal_position",
                    (table,),
                )
            ]
            indexes = set()
            for index, unique, predicate, cols, constraint in conn.execute(
                "SELECT i.relname, ix.indisunique, pg_get_expr(ix.indpred, ix.indrelid),"
                " ARRAY(SELECT a.attname FROM unnest(ix.indkey) WITH ORDINALITY k(attnum, n)"
                "       JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum"
                "       ORDER BY k.n),"
                " EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = ix.indexrelid)"
                " FROM pg_index ix JOIN pg_class t ON t.oid = ix.indrelid"
                " JOIN pg_class i ON i.oid = ix.indexrelid WHERE t.relname = %s",
                (table,),
            ):
                name = None if constraint else index
                indexes.add((name, tuple(cols), bool(unique), _normal(predicate)))
            tables[table] = {"columns": columns, "indexes": indexes}
        return tables


def test_one_schema_for_both_databases(tmp_path: Path, postgres_url: str) -> None:
    """The schema both engines create from the one schema text is the same: tables, columns in
    order, types, NOT NULL, defaults, identity keys, indexes (unique, partial)."""
    SqliteDatabase(tmp_path / "index.sqlite3").close()
    PostgresDatabase(postgres_url).close()
    lite = sqlite_schema(tmp_path / "index.sqlite3")
    pg = postgres_schema(postgres_url)
    assert sorted(lite) == sorted(pg)
    for table in lite:
        assert lite[table]["columns"] == pg[table]["columns"], table
        assert lite[table]["indexes"] == pg[table]["indexes"], table
    assert {"attempt_token", "lease_until", "staged_at", "dispatched_at"} <= {
        c[0] for c in pg["jobs"]["columns"]
    }


def test_schema_version_is_readable(tmp_path: Path, postgres_url: str) -> None:
    lite = SqliteDatabase(tmp_path / "index.sqlite3")
    pg = PostgresDatabase(postgres_url)
    try:
        assert schema_version(lite) == schema_version(pg) == SCHEMA_VERSION
        assert PostgresDatabase(postgres_url).dialect.name == "postgresql"  # opened twice: fine
    finally:
        lite.close()
        pg.close()


def test_placeholders_translate_outside_quotes() -> None:
    assert translate_sql("SELECT '?%', ? WHERE a LIKE 'x%' AND b = ?") == (
        "SELECT '?%%', %s WHERE a LIKE 'x%%' AND b = %s"
    )


def test_the_sqlite_functions_the_queries_use(postgres_url: str) -> None:
    """json_extract, json_each (arrays and objects) and group_concat answer as SQLite's do."""
    db = PostgresDatabase(postgres_url)
    lite = SqliteDatabase(Path(tempfile.mkdtemp()) / "index.sqlite3")
    doc = '{"algorithm": "a", "inputs": {"ct": ["1.2", "1.3"]}, "n": 3}'
    queries = [
        ("SELECT json_extract(?, '$.algorithm'), json_extract(?, '$.inputs.ct[1]')", (doc, doc)),
        ("SELECT key, value FROM json_each(?) ORDER BY key", ('{"b": "x", "a": "y"}',)),
        ("SELECT value FROM json_each(?) ORDER BY value", ('["z", "y"]',)),
        ("SELECT CAST(json_extract(?, '$.n') AS INTEGER) + 1", (doc,)),
        ("SELECT group_concat(DISTINCT value) FROM json_each(?)", ('["q", "q"]',)),
    ]
    try:
        for sql, params in queries:
            with db.reading() as conn:
                got = [tuple(r) for r in conn.execute(sql, params).fetchall()]
            with lite.reading() as conn:
                want = [tuple(r) for r in conn.execute(sql, params).fetchall()]
            assert got == want, sql
    finally:
        db.close()
        lite.close()


def _corpus_file(corpus: Path) -> Path:
    return next(p for p in sorted((corpus / "brain-mr-sag-anon").rglob("*")) if p.is_file())


def test_c_store_path_on_postgresql(tmp_path: Path, postgres_url: str, corpus: Path) -> None:
    """A real corpus instance stored through InstanceStore on PostgreSQL: indexed with its
    study and series; the same instance again is a duplicate, nothing added."""
    path = _corpus_file(corpus)
    syntax, data = dataset_bytes(path)
    store = InstanceStore(tmp_path / "data", PostgresDatabase(postgres_url))
    try:
        first = store.put(data, syntax, SENDER)
        again = store.put(data, syntax, SENDER)
        assert first.result is StoreResult.STORED and again.result is StoreResult.DUPLICATE
        ds = dcmread(path, stop_before_pixels=True)
        with store.db.reading() as conn:
            row = conn.execute("SELECT * FROM instances").fetchone()
            counts = [
                conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("studies", "series", "instances")
            ]
        assert counts == [1, 1, 1]
        assert row["sop_instance_uid"] == ds.SOPInstanceUID and row["size"] == len(data)
        assert (store.data_dir / row["path"]).read_bytes().endswith(data)
    finally:
        store.close()


def test_a_failed_index_commit_leaves_nothing(
    tmp_path: Path, postgres_url: str, corpus: Path
) -> None:
    """The file is written before the index commit; when PostgreSQL refuses the commit the
    C-STORE gets a failure status and neither the file nor any row stays."""
    import psycopg

    db = PostgresDatabase(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'the disk is full'; END $$"
        )
        admin.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON instances"
            " FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    store = InstanceStore(tmp_path / "data", db)
    try:
        with pytest.raises(OutOfResources, match=r"index database failed \(RaiseException\)"):
            _put(store, _corpus_file(corpus))
        assert not [p for p in store.data_dir.rglob("*") if p.is_file()]
        with db.reading() as conn:
            for table in ("studies", "series", "instances"):
                assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
    finally:
        store.close()


def _put(store: InstanceStore, path: Path) -> StoredInstance:
    syntax, data = dataset_bytes(path)
    return store.put(data, syntax, SENDER)


def test_reconnects_after_a_restart_and_refuses_while_down(tmp_path: Path, corpus: Path) -> None:
    """PostgreSQL stopped: a C-STORE is refused with a failure status (OutOfResources) and
    leaves neither file nor row; started again (and after a kill -9): the next store works on
    the same Database, reconnected."""
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="dicom-node-pg-restart-"))).start()
    try:
        store = InstanceStore(tmp_path / "data", PostgresDatabase(server.fresh_url()))
        files = sorted(p for p in (corpus / "brain-mr-sag-anon").rglob("*") if p.is_file())[:3]
        _put(store, files[0])
        server.stop()
        with pytest.raises(OutOfResources, match="index database failed"):
            _put(store, files[1])
        assert len(list(store.instances_dir.rglob("*.dcm"))) == 1
        server.start()
        assert _put(store, files[1]).result is StoreResult.STORED
        server.kill()
        server.start()
        assert _put(store, files[2]).result is StoreResult.STORED
        with store.db.reading() as conn:
            assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 3
        assert len(list(store.instances_dir.rglob("*.dcm"))) == 3
        store.close()
    finally:
        server.close()


def test_readers_are_read_only(tmp_path: Path, postgres_url: str) -> None:
    import psycopg

    PostgresDatabase(postgres_url).close()
    config = load_config(
        environ={
            "DICOM_NODE__STORE__DATA_DIR": str(tmp_path),
            "DICOM_NODE__CLUSTER__DATABASE_URL": postgres_url,
            "DICOM_NODE__CLUSTER__BROKER_URL": "amqp://127.0.0.1//",
            "DICOM_NODE__CLUSTER__OBJECTS__URL": f"file://{tmp_path}/objects",
        }
    )
    with open_reader(config) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM jobs")


@pytest.mark.slow
def test_migrate_an_embedded_nodes_history(
    make_node: Any, tmp_path: Path, postgres_url: str
) -> None:
    """A real embedded node receives a CT, runs the example algorithm and delivers; its SQLite
    index migrated into PostgreSQL has every row (a job's rows equal), and new IDs continue
    after the old ones. A non-empty target is refused."""
    from dicom_node.scu import send

    node: NodeProcess = make_node(
        assembly={"series_quiet_seconds": 1, "study_quiet_seconds": 1},
        destinations={"share": {"type": "folder", "path": str(tmp_path / "outbox")}},
        routing={
            "rules": [{"algorithm": "example-threshold", "series": {"modality": ["CT"]}}],
            "destinations": ["share"],
        },
        env=plugin_env(),
    )
    ct = write_ct_series(tmp_path / "ct", PHANTOMS["axial"])
    assert len(send(ct, "127.0.0.1", node.port).sent) == len(ct)
    node.wait_for("SELECT COUNT(*) FROM deliveries WHERE state = 'sent'", 1, timeout_s=120)
    node.stop()

    path = database_path(node.data_dir)
    pg = PostgresDatabase(postgres_url)
    try:
        copied = migrate_from_sqlite(path, pg)
        lite = sqlite3.connect(path)
        lite.row_factory = sqlite3.Row
        for table, count in copied.items():
            assert lite.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == count, table
        assert copied["instances"] == len(ct) and copied["jobs"] >= 3
        job_id = lite.execute("SELECT MAX(id) FROM jobs WHERE kind = 'inference'").fetchone()[0]
        with pg.reading() as conn:
            for table, key in (("jobs", "id"), ("results", "job_id"), ("deliveries", "job_id")):
                want = [
                    tuple(r)
                    for r in lite.execute(f"SELECT * FROM {table} WHERE {key} = ?", (job_id,))
                ]
                got = [
                    tuple(r)
                    for r in conn.execute(f"SELECT * FROM {table} WHERE {key} = ?", (job_id,))
                ]
                assert got == want, table
        _same_reads(node.data_dir, postgres_url)
        with pg.transaction() as conn:
            new_id = conn.execute(
                "INSERT INTO jobs (kind, subject_uid, generation, payload, state, created_at)"
                " VALUES ('series_complete', 'x', 1, '{}', 'queued', 0) RETURNING id"
            ).fetchone()[0]
        assert new_id == lite.execute("SELECT MAX(id) FROM jobs").fetchone()[0] + 1
        lite.close()
        with pytest.raises(ValueError, match="not empty"):
            migrate_from_sqlite(path, pg)
    finally:
        pg.close()


def _same_reads(data_dir: Path, url: str) -> None:
    """The API, ``dicom-node status`` and the metrics read the same from both databases."""
    from dicom_node import api
    from dicom_node.metrics import IndexCollector
    from dicom_node.status import build_report

    embedded = load_config(environ={"DICOM_NODE__STORE__DATA_DIR": str(data_dir)})
    cluster = load_config(
        environ={
            "DICOM_NODE__STORE__DATA_DIR": str(data_dir),
            "DICOM_NODE__CLUSTER__DATABASE_URL": url,
            "DICOM_NODE__CLUSTER__BROKER_URL": "amqp://127.0.0.1//",
            "DICOM_NODE__CLUSTER__OBJECTS__URL": f"file://{data_dir}/objects",
        }
    )

    def reads(config: Any) -> dict[str, Any]:
        with open_reader(config) as conn:
            study = conn.execute("SELECT MIN(study_uid) FROM studies").fetchone()[0]
            job = conn.execute("SELECT MAX(id) FROM jobs").fetchone()[0]
            return {
                "studies": api.studies(conn),
                "study": api.study(conn, study),
                "series": api.series_list(conn),
                "decisions": api.decisions(conn),
                "jobs": api.jobs(conn),
                "job": api.job(conn, job),
                "deliveries": api.deliveries(conn),
                "destinations": api.destinations(conn, config),
                "workers": api.workers(conn),
                "algorithms": api.algorithms(conn),
                # The mode is what differs (tests/test_cluster_status.py checks it).
                "status": {**build_report(config).as_dict(), "mode": None},
                "metrics": sorted(  # a scrape's series have no order
                    (s.name, sorted(s.labels.items()), s.value)
                    for m in IndexCollector(config).collect()
                    if m.name != "dicom_node_disk_free_bytes"
                    and not m.name.startswith("dicom_node_cluster_")  # cluster mode's own
                    for s in m.samples
                ),
            }

    want, got = reads(embedded), reads(cluster)
    for key in want:
        assert got[key] == want[key], key


def test_cluster_migrate_command(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``dicom-node cluster migrate --from-sqlite PATH`` copies, says how much, and refuses
    to run twice into the same database."""
    from dicom_node.cli import main

    path = tmp_path / "index.sqlite3"
    lite = SqliteDatabase(path)
    with lite.transaction() as conn:
        for n in range(3):
            conn.execute(
                "INSERT INTO jobs (kind, subject_uid, generation, payload, state, created_at)"
                " VALUES ('series_complete', ?, 1, '{}', 'succeeded', ?)",
                (f"1.2.{n}", n),
            )
    lite.close()
    monkeypatch.setenv("DICOM_NODE__CLUSTER__DATABASE_URL", postgres_url)
    monkeypatch.setenv("DICOM_NODE__CLUSTER__BROKER_URL", "amqp://127.0.0.1//")
    monkeypatch.setenv("DICOM_NODE__CLUSTER__OBJECTS__URL", f"file://{tmp_path}/objects")
    assert main(["cluster", "migrate", "--from-sqlite", str(path)]) == 0
    out = capsys.readouterr().out
    assert "jobs: 3 rows" in out and "migrated 3 rows" in out
    assert main(["cluster", "migrate", "--from-sqlite", str(path)]) == 1
    assert "not empty (table jobs has rows)" in capsys.readouterr().err
    assert main(["cluster", "migrate", "--from-sqlite", str(tmp_path / "none")]) == 1


def test_assembly_routing_and_purges_on_postgresql(
    tmp_path: Path, postgres_url: str, corpus: Path
) -> None:
    """The index's writers beside the store run their same statements on PostgreSQL: a
    released association completes its series and study (one completion job each), a routing
    decision queues its inference job once however often it is recorded, a purge record is
    replaced when the purge is recorded again."""
    from dicom_node.assembly import Assembler
    from dicom_node.config import AssemblyConfig
    from dicom_node.jobs import JobKind, job_store
    from dicom_node.retention import _record_purge
    from dicom_node.route import Decision, Routed, record_decision

    db = PostgresDatabase(postgres_url)
    store = InstanceStore(tmp_path / "data", db)
    try:
        files = sorted(p for p in (corpus / "brain-mr-sag-anon").rglob("*") if p.is_file())[:2]
        assembler = Assembler(db, AssemblyConfig())
        assembler.association_opened(1)
        for path in files:
            assembler.instance_stored(1, _put(store, path))
        completions = assembler.association_ended(1, released=True)
        assert sorted(c.level.value for c in completions) == ["series", "study"]
        assert {c.instances for c in completions} == {2}
        series = next(c for c in completions if c.level.value == "series")
        jobs = job_store(db)
        decision = Decision(
            "series", series.uid, series.generation, [Routed("example", {"series": series.uid})]
        )
        with db.transaction() as conn:
            (job_id,) = record_decision(conn, jobs, decision)
        with db.transaction() as conn:
            assert record_decision(conn, jobs, decision) == []
        job = jobs.get(job_id)
        assert job is not None and job.kind == JobKind.INFERENCE
        _record_purge(db, "study:1.2.3", 1.0, 2, 10)
        _record_purge(db, "study:1.2.3", 2.0, 3, 20)
        with db.reading() as conn:
            rows = [tuple(r) for r in conn.execute("SELECT * FROM purges")]
        assert rows == [("study:1.2.3", 2.0, 3, 20)]
    finally:
        store.close()
