"""What the JSON API and the dashboard show, read from the index.

Every function takes a read-only connection and returns plain JSON-able data. Times are Unix
seconds (the dashboard formats them in the reader's time zone). Only identifiers the index
holds are shown — UIDs, AE titles, series descriptions — never patient names or IDs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

from dicom_node.config import SENDER, NodeConfig, ObjectsConfig
from dicom_node.database import Connection, Row
from dicom_node.deliver import target_label
from dicom_node.jobs import (
    RETRIEVED_MARK,
    Delivery,
    DeliveryState,
    InferenceRecord,
    JobState,
    job_store_reading,
)
from dicom_node.metrics import WORKER_STALE_S


def studies(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently received studies, with what became of them in one line each.

    The dashboard asks every few seconds, so this runs four statements whatever the limit:
    the listed studies, then their instances, jobs and deliveries, each grouped over all of
    them at once. Only the listed studies are looked into.
    """
    rows = conn.execute(
        "SELECT st.study_uid, st.first_received, st.last_received, st.completed_at,"
        " st.completions,"
        " (SELECT COUNT(*) FROM series s WHERE s.study_uid = st.study_uid) AS series,"
        " (SELECT GROUP_CONCAT(DISTINCT s.modality) FROM series s"
        "   WHERE s.study_uid = st.study_uid) AS modalities"
        " FROM (SELECT * FROM studies ORDER BY last_received DESC LIMIT ?) st"
        " ORDER BY st.last_received DESC",
        (limit,),
    ).fetchall()
    listed = json.dumps([row["study_uid"] for row in rows])  # one parameter, however many
    instances: dict[str, int] = {}
    senders: dict[str, list[str]] = {}
    for uid, aet, count in conn.execute(
        "SELECT study_uid, calling_aet, COUNT(*) FROM instances"
        " WHERE study_uid IN (SELECT value FROM json_each(?))"
        " GROUP BY study_uid, calling_aet"
        " ORDER BY study_uid, MIN(received_at), calling_aet",  # first sent first
        (listed,),
    ):
        instances[uid] = instances.get(uid, 0) + count
        senders.setdefault(uid, []).append(aet)
    job_states, delivery_states = job_store_reading(conn).study_tallies(
        [row["study_uid"] for row in rows]
    )
    out = []
    for row in rows:
        uid = row["study_uid"]
        out.append(
            {
                "study_uid": uid,
                "first_received": row["first_received"],
                "last_received": row["last_received"],
                "completed_at": row["completed_at"],
                "completions": row["completions"],
                "series": row["series"],
                "instances": instances.get(uid, 0),
                # As the comma-joined list it was: an AE title may hold a comma.
                "senders": ",".join(senders.get(uid, [])).split(","),
                "modalities": sorted(filter(None, (row["modalities"] or "").split(","))),
                "jobs": {state.value: job_states.get((uid, state), 0) for state in JobState},
                "deliveries": {
                    state.value: delivery_states.get((uid, state), 0) for state in DeliveryState
                },
            }
        )
    return out


def study(conn: Connection, study_uid: str) -> dict[str, Any] | None:
    """One study: its series, every routing decision about it, its jobs with their timelines."""
    row = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    if row is None:
        return None
    series = [
        dict(r)
        for r in conn.execute(
            "SELECT s.series_uid, s.modality, s.series_number, s.description,"
            " s.first_received, s.last_received, s.completed_at, s.completions,"
            " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS instances,"
            # Fetched from a PACS (dicom_node.retrieve): the instances carry its mark.
            " (SELECT MIN(i.calling_aet) FROM instances i WHERE i.series_uid = s.series_uid"
            " AND i.peer_host LIKE ?) AS fetched_from"
            " FROM series s WHERE s.study_uid = ? ORDER BY s.series_number, s.first_received",
            (f"{RETRIEVED_MARK}%", study_uid),
        )
    ]
    subjects = [study_uid] + [s["series_uid"] for s in series]
    marks = ",".join("?" * len(subjects))
    decisions = [
        _decision(r)
        for r in conn.execute(
            f"SELECT * FROM routing_decisions WHERE subject_uid IN ({marks})"
            " ORDER BY decided_at, id",
            subjects,
        )
    ]
    jobs = _jobs(conn, study_uid=study_uid)
    purged = conn.execute(
        "SELECT purged_at, files, bytes FROM purges WHERE subject = ?", (f"study:{study_uid}",)
    ).fetchone()
    return {
        **dict(row),
        "series": series,
        "decisions": decisions,
        "jobs": jobs,
        "purged": dict(purged) if purged else None,
    }


def series_list(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in conn.execute(
            "SELECT s.series_uid, s.study_uid, s.modality, s.series_number, s.description,"
            " s.last_received, s.completed_at, s.completions,"
            " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS instances"
            " FROM series s ORDER BY s.last_received DESC LIMIT ?",
            (limit,),
        )
    ]


def decisions(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    return [
        _decision(r)
        for r in conn.execute(
            "SELECT * FROM routing_decisions ORDER BY decided_at DESC, id DESC LIMIT ?", (limit,)
        )
    ]


def _decision(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "level": row["level"],
        "subject_uid": row["subject_uid"],
        "generation": row["generation"],
        "decided_at": row["decided_at"],
        "summary": row["summary"],
        "routed": json.loads(row["routed"]),
        "not_routed": json.loads(row["not_routed"]),
    }


def jobs(conn: Connection, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    if state is not None and state not in {s.value for s in JobState}:
        return []  # no job is in a state that does not exist
    return _jobs(conn, state=JobState(state) if state else None, limit=limit)


def job(conn: Connection, job_id: int) -> dict[str, Any] | None:
    found = _jobs(conn, job_id=job_id)
    return found[0] if found else None


def _jobs(
    conn: Connection,
    *,
    job_id: int | None = None,
    study_uid: str | None = None,
    state: JobState | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    store = job_store_reading(conn)
    records = store.inference_records(job_id=job_id, study_uid=study_uid, state=state, limit=limit)
    ids = [r.job.id for r in records]
    delivered = store.deliveries_of(ids)
    outputs: dict[int, list[dict[str, Any]]] = {}
    if records:
        for o in conn.execute(
            "SELECT job_id, kind, sop_instance_uid, series_uid FROM outputs WHERE job_id IN"
            f" ({','.join('?' * len(ids))}) ORDER BY kind",
            ids,
        ):
            outputs.setdefault(o["job_id"], []).append(dict(o))
    return [_job(r, delivered.get(r.job.id, []), outputs.get(r.job.id, [])) for r in records]


def _job(
    record: InferenceRecord, deliveries: list[Delivery], outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    job = record.job
    payload = job.inference
    sent = [d.sent_at for d in deliveries if d.sent_at is not None]
    all_sent = bool(deliveries) and all(d.state is DeliveryState.SENT for d in deliveries)
    inferred_at = (
        job.started_at + record.run_s
        if job.started_at is not None and record.run_s is not None
        else None
    )
    # received -> complete -> routed -> inference -> written -> delivered; each step's time and
    # how long it took since the step before it.
    steps = [
        ("received", record.last_received),
        ("complete", record.completed_at),
        ("routed", record.routed_at),
        # Cluster mode: its inputs reached the object store, then a worker's doorbell rang.
        *([("staged", job.staged_at)] if job.staged_at is not None else []),
        *([("dispatched", job.dispatched_at)] if job.dispatched_at is not None else []),
        ("started", job.started_at),
        ("inference", inferred_at),
        ("written", record.written_at),
    ]
    if deliveries:  # a route without destinations ends at the written results
        steps.append(("delivered", max(sent) if all_sent else None))
    timeline = []
    previous = record.first_received
    for name, at in steps:
        timeline.append(
            {
                "step": name,
                "at": at,
                "took_s": round(at - previous, 3) if at is not None and previous else None,
            }
        )
        previous = at if at is not None else previous
    return {
        "id": job.id,
        "algorithm": payload.algorithm,
        "level": payload.level,
        "inputs": dict(payload.inputs),
        "study_uid": record.study_uid,
        "state": job.state.value,
        "priority": job.priority,
        "attempts": job.attempts,
        "error": job.error,
        "worker": job.worker,  # the attempt's (a cluster worker's name on its host)
        "staged_at": job.staged_at,
        "dispatched_at": job.dispatched_at,
        "device": record.device,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "timeline": timeline,
        "outputs": outputs,
        "deliveries": [
            {
                "destination": d.label,
                "state": d.state.value,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "next_attempt_at": (
                    d.next_attempt_at if d.state is DeliveryState.PENDING else None
                ),
                "sent_at": d.sent_at,
            }
            for d in deliveries
        ],
    }


def deliveries(
    conn: Connection, *, state: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    if state is not None and state not in {s.value for s in DeliveryState}:
        return []  # no delivery is in a state that does not exist
    found = job_store_reading(conn).deliveries(
        state=DeliveryState(state) if state else None, limit=limit
    )
    return [{**asdict(d), "state": d.state.value} for d in found]


def destinations(conn: Connection, config: NodeConfig) -> list[dict[str, Any]]:
    """Each destination with its deliveries' states and its health in a word.

    ``ok``: nothing failing; ``retrying``: deliveries backing off after failures; ``dead
    letters``: deliveries given up, waiting for a person; ``unused``: nothing sent there yet.
    """
    configured: dict[str, str] = {
        name: target_label(target) for name, target in config.destinations.items()
    }
    counts = {(t.destination, t.peer_aet): t for t in job_store_reading(conn).destinations()}
    keys = [(name, "") for name in configured] + [
        (SENDER, aet) for aet in config.peers if (SENDER, aet) not in counts
    ]
    keys += [k for k in counts if k not in keys]
    out = []
    for name, peer in keys:
        c = counts.get((name, peer))
        if name == SENDER:
            known = config.peers.get(peer)
            where = f"{peer}@{known.host}:{known.port}" if known else f"{peer} (not in peers)"
        else:
            where = configured.get(name, "(no longer configured)")
        health = (
            "unused"
            if c is None
            else "dead letters"
            if c.dead
            else "retrying"
            if c.retrying
            else "ok"
            if c.sent
            else "unused"
        )
        known_type = config.destinations[name].type if name in config.destinations else None
        out.append(
            {
                "destination": f"{name} ({peer})" if peer else name,
                # dicom, dicomweb, folder, or a notification: hl7, fhir, webhook.
                "type": "dicom" if name == SENDER else known_type,
                "target": where,
                "health": health,
                "pending": c.pending if c else 0,
                "sent": c.sent if c else 0,
                "dead": c.dead if c else 0,
                "last_sent_at": c.last_sent_at if c else None,
                "last_error": c.last_error if c else None,
            }
        )
    return out


def workers(conn: Connection, limit: int = 20) -> list[dict[str, Any]]:
    """Inference workers seen, those not stopped first, newest first, with whether their
    heartbeat is recent; each with its host, device, job and phase (cluster workers run on
    other hosts: the host names them)."""
    now = time.time()
    out = []
    for row in conn.execute(
        "SELECT * FROM workers ORDER BY CASE WHEN stopped_at IS NULL THEN 0 ELSE 1 END,"
        " started_at DESC LIMIT ?",
        (limit,),
    ):
        item = dict(row)
        item["algorithms"] = json.loads(row["algorithms"])
        item["gpu_memory"] = json.loads(row["gpu_memory"] or "null")
        item["alive"] = row["stopped_at"] is None and now - row["heartbeat_at"] < WORKER_STALE_S
        out.append(item)
    return out


def algorithms(conn: Connection) -> dict[str, Any]:
    """The algorithms the newest live worker can run (it discovered them at its start)."""
    for worker in workers(conn):
        if worker["alive"]:
            return {
                "worker": worker["name"],
                "device": worker["device"],
                "algorithms": worker["algorithms"],
            }
    return {"worker": None, "device": None, "algorithms": []}


def server_address(url: str | None) -> str | None:
    """``host:port`` of a server URL, without user, password or path (what the dashboard,
    ``status`` and the readiness messages may show); None when not set."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.hostname is None:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host if parts.port is None else f"{host}:{parts.port}"


def objects_address(objects: ObjectsConfig) -> str | None:
    """The object store as it may be shown: its URL (a bucket and prefix, or a folder) and
    the S3 endpoint's host:port, never the keys."""
    endpoint = server_address(objects.endpoint_url)
    return objects.url if endpoint is None else f"{objects.url} at {endpoint}"


def mode(config: NodeConfig) -> dict[str, Any]:
    """Embedded (SQLite, local files, the node's own workers) or cluster, with the cluster's
    servers by host:port (credentials are never shown)."""
    cluster = config.cluster
    if not cluster.enabled:
        return {"mode": "embedded"}
    return {
        "mode": "cluster",
        "postgresql": server_address(cluster.database_url),
        "rabbitmq": server_address(cluster.broker_url),
        "objects": objects_address(cluster.objects),
    }


def node(conn: Connection, config: NodeConfig) -> dict[str, Any]:
    """The node's mode and, in cluster mode, its inference jobs between routing and a
    worker (:class:`~dicom_node.jobs.DispatchTally`)."""
    found = mode(config)
    if config.cluster.enabled:
        found["jobs"] = asdict(job_store_reading(conn).dispatch_tally())
    return found
