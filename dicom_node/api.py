"""What the JSON API and the dashboard show, read from the index.

Every function takes a read-only connection and returns plain JSON-able data. Times are Unix
seconds (the dashboard formats them in the reader's time zone). Only identifiers the index
holds are shown — UIDs, AE titles, series descriptions — never patient names or IDs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from dicom_node.config import SENDER, NodeConfig
from dicom_node.deliver import Delivery, deliveries_of, target_label
from dicom_node.jobs import JobKind
from dicom_node.metrics import WORKER_STALE_S

# The study a job belongs to: its subject is a study, or a series of one.
_JOB_STUDY = (
    "COALESCE((SELECT s.study_uid FROM series s WHERE s.series_uid = j.subject_uid), j.subject_uid)"
)


def studies(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
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
        " GROUP BY study_uid, calling_aet ORDER BY study_uid, MIN(rowid)",  # first sent first
        (listed,),
    ):
        instances[uid] = instances.get(uid, 0) + count
        senders.setdefault(uid, []).append(aet)
    job_states = _count_by_study(
        conn,
        "SELECT study_uid, state, COUNT(*) FROM _listed_jobs GROUP BY study_uid, state",
        listed,
    )
    delivery_states = _count_by_study(
        conn,
        "SELECT j.study_uid, d.state, COUNT(*) FROM _listed_jobs j"
        " JOIN deliveries d ON d.job_id = j.id GROUP BY j.study_uid, d.state",
        listed,
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
                "jobs": {
                    state: job_states.get((uid, state), 0)
                    for state in ("queued", "running", "succeeded", "failed")
                },
                "deliveries": {
                    state: delivery_states.get((uid, state), 0)
                    for state in ("pending", "sent", "dead")
                },
            }
        )
    return out


def _count_by_study(
    conn: sqlite3.Connection, query: str, listed_uids: str
) -> dict[tuple[str, str], int]:
    """Run a ``(study_uid, state, count)`` query over ``_listed_jobs``: the inference jobs of
    the studies in ``listed_uids`` (a JSON array, so any number of them is one parameter)."""
    rows = conn.execute(
        "WITH _inference AS (SELECT j.id, j.state, " + _JOB_STUDY + " AS study_uid"
        "   FROM jobs j WHERE j.kind = 'inference'),"
        " _listed_jobs AS (SELECT * FROM _inference"
        "   WHERE study_uid IN (SELECT value FROM json_each(?))) " + query,
        (listed_uids,),
    )
    return {(uid, state): count for uid, state, count in rows}


def study(conn: sqlite3.Connection, study_uid: str) -> dict[str, Any] | None:
    """One study: its series, every routing decision about it, its jobs with their timelines."""
    row = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    if row is None:
        return None
    series = [
        dict(r)
        for r in conn.execute(
            "SELECT s.series_uid, s.modality, s.series_number, s.description,"
            " s.first_received, s.last_received, s.completed_at, s.completions,"
            " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS instances"
            " FROM series s WHERE s.study_uid = ? ORDER BY s.series_number, s.first_received",
            (study_uid,),
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
    jobs = _jobs(conn, "WHERE j.kind = 'inference' AND " + _JOB_STUDY + " = ?", (study_uid,))
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


def series_list(conn: sqlite3.Connection, limit: int = 100) -> list[dict[str, Any]]:
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


def decisions(conn: sqlite3.Connection, limit: int = 100) -> list[dict[str, Any]]:
    return [
        _decision(r)
        for r in conn.execute(
            "SELECT * FROM routing_decisions ORDER BY decided_at DESC, id DESC LIMIT ?", (limit,)
        )
    ]


def _decision(row: sqlite3.Row) -> dict[str, Any]:
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


def jobs(
    conn: sqlite3.Connection, *, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    where = "WHERE j.kind = 'inference'" + (" AND j.state = ?" if state else "")
    return _jobs(conn, where, (state,) if state else (), limit=limit)


def job(conn: sqlite3.Connection, job_id: int) -> dict[str, Any] | None:
    found = _jobs(conn, "WHERE j.kind = 'inference' AND j.id = ?", (job_id,))
    return found[0] if found else None


def _received(aggregate: str) -> str:
    """When the instances a job's completion took in arrived (MIN or MAX): those of its own
    series or study (by its level) received after the completion before it and by its own.
    The index keeps each instance's latest copy only: a resend moves its copies to the later
    completion, and an earlier one whose copies were all replaced has none (NULL)."""
    window = (
        " AND i.received_at <= COALESCE(c.created_at, j.created_at)"
        " AND i.received_at > COALESCE(before.created_at, 0)"
    )
    return (
        "CASE json_extract(j.payload, '$.level')"
        f" WHEN 'study' THEN (SELECT {aggregate}(i.received_at) FROM instances i"
        f"   WHERE i.study_uid = j.subject_uid{window})"
        f" ELSE (SELECT {aggregate}(i.received_at) FROM instances i"
        f"   WHERE i.series_uid = j.subject_uid{window}) END"
    )


def _jobs(
    conn: sqlite3.Connection, where: str, params: tuple, *, limit: int = 1000
) -> list[dict[str, Any]]:
    # The completion a job was routed from is of its level: a series and its study may share
    # a UID (and so a subject and a generation), and a job joined to both was listed twice.
    rows = conn.execute(
        "SELECT j.*, " + _JOB_STUDY + " AS study_uid,"
        " r.created_at AS written_at, r.run_s, r.device,"
        " c.created_at AS completed_at, c.finished_at AS routed_at,"
        f" {_received('MIN')} AS first_received, {_received('MAX')} AS last_received"
        " FROM jobs j LEFT JOIN results r ON r.job_id = j.id"
        " LEFT JOIN jobs c ON c.subject_uid = j.subject_uid AND c.generation = j.generation"
        "   AND c.kind = CASE json_extract(j.payload, '$.level')"
        f"     WHEN 'study' THEN '{JobKind.STUDY_COMPLETE.value}'"
        f"     ELSE '{JobKind.SERIES_COMPLETE.value}' END"
        # Completions are counted one by one (assembly): the one before is generation - 1.
        " LEFT JOIN jobs before ON before.subject_uid = c.subject_uid"
        "   AND before.kind = c.kind AND before.generation = c.generation - 1"
        f" {where} ORDER BY j.id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    delivered = deliveries_of(conn, [r["id"] for r in rows])
    outputs: dict[int, list[dict]] = {}
    if rows:
        for o in conn.execute(
            "SELECT job_id, kind, sop_instance_uid, series_uid FROM outputs WHERE job_id IN"
            f" ({','.join('?' * len(rows))}) ORDER BY kind",
            [r["id"] for r in rows],
        ):
            outputs.setdefault(o["job_id"], []).append(dict(o))
    return [_job(r, delivered.get(r["id"], []), outputs.get(r["id"], [])) for r in rows]


def _job(row: sqlite3.Row, deliveries: list[Delivery], outputs: list[dict]) -> dict[str, Any]:
    payload = json.loads(row["payload"])
    sent = [d.sent_at for d in deliveries if d.sent_at is not None]
    all_sent = bool(deliveries) and all(d.state == "sent" for d in deliveries)
    inferred_at = (
        row["started_at"] + row["run_s"]
        if row["started_at"] is not None and row["run_s"] is not None
        else None
    )
    # received -> complete -> routed -> inference -> written -> delivered; each step's time and
    # how long it took since the step before it.
    steps = [
        ("received", row["last_received"]),
        ("complete", row["completed_at"]),
        ("routed", row["routed_at"]),
        ("started", row["started_at"]),
        ("inference", inferred_at),
        ("written", row["written_at"]),
    ]
    if deliveries:  # a route without destinations ends at the written results
        steps.append(("delivered", max(sent) if all_sent else None))
    timeline = []
    previous = row["first_received"]
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
        "id": row["id"],
        "algorithm": payload.get("algorithm"),
        "level": payload.get("level"),
        "inputs": payload.get("inputs", {}),
        "study_uid": row["study_uid"],
        "state": row["state"],
        "attempts": row["attempts"],
        "error": row["error"],
        "device": row["device"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "timeline": timeline,
        "outputs": outputs,
        "deliveries": [
            {
                "destination": d.label,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "next_attempt_at": d.next_attempt_at if d.state == "pending" else None,
                "sent_at": d.sent_at,
            }
            for d in deliveries
        ],
    }


def deliveries(
    conn: sqlite3.Connection, *, state: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    where = "WHERE state = ?" if state else ""
    return [
        dict(r)
        for r in conn.execute(
            f"SELECT * FROM deliveries {where} ORDER BY id DESC LIMIT ?",
            ((state,) if state else ()) + (limit,),
        )
    ]


def destinations(conn: sqlite3.Connection, config: NodeConfig) -> list[dict[str, Any]]:
    """Each destination with its deliveries' states and its health in a word.

    ``ok``: nothing failing; ``retrying``: deliveries backing off after failures; ``dead
    letters``: deliveries given up, waiting for a person; ``unused``: nothing sent there yet.
    """
    configured: dict[str, str] = {
        name: target_label(target) for name, target in config.destinations.items()
    }
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    for row in conn.execute(
        "SELECT destination, peer_aet, SUM(state = 'pending') AS pending,"
        " SUM(state = 'pending' AND attempts > 0) AS retrying, SUM(state = 'sent') AS sent,"
        " SUM(state = 'dead') AS dead, MAX(sent_at) AS last_sent_at FROM deliveries"
        " GROUP BY destination, peer_aet"
    ):
        counts[(row["destination"], row["peer_aet"])] = dict(row)
    error_rows = conn.execute(
        "SELECT destination, peer_aet, last_error FROM deliveries WHERE state != 'sent'"
        " AND last_error IS NOT NULL ORDER BY id"
    )
    errors = {(r["destination"], r["peer_aet"]): r["last_error"] for r in error_rows}
    keys = [(name, "") for name in configured] + [
        (SENDER, aet) for aet in config.peers if (SENDER, aet) not in counts
    ]
    keys += [k for k in counts if k not in keys]
    out = []
    for name, peer in keys:
        c = counts.get((name, peer), {})
        if name == SENDER:
            known = config.peers.get(peer)
            where = f"{peer}@{known.host}:{known.port}" if known else f"{peer} (not in peers)"
        else:
            where = configured.get(name, "(no longer configured)")
        health = (
            "dead letters"
            if c.get("dead")
            else "retrying"
            if c.get("retrying")
            else "ok"
            if c.get("sent")
            else "unused"
        )
        out.append(
            {
                "destination": f"{name} ({peer})" if peer else name,
                "target": where,
                "health": health,
                "pending": c.get("pending") or 0,
                "sent": c.get("sent") or 0,
                "dead": c.get("dead") or 0,
                "last_sent_at": c.get("last_sent_at"),
                "last_error": errors.get((name, peer)),
            }
        )
    return out


def workers(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Inference workers seen, newest first, with whether their heartbeat is recent."""
    now = time.time()
    out = []
    for row in conn.execute("SELECT * FROM workers ORDER BY started_at DESC LIMIT 20"):
        item = dict(row)
        item["algorithms"] = json.loads(row["algorithms"])
        item["gpu_memory"] = json.loads(row["gpu_memory"] or "null")
        item["alive"] = row["stopped_at"] is None and now - row["heartbeat_at"] < WORKER_STALE_S
        out.append(item)
    return out


def algorithms(conn: sqlite3.Connection) -> dict[str, Any]:
    """The algorithms the newest live worker can run (it discovered them at its start)."""
    for worker in workers(conn):
        if worker["alive"]:
            return {
                "worker": worker["name"],
                "device": worker["device"],
                "algorithms": worker["algorithms"],
            }
    return {"worker": None, "device": None, "algorithms": []}
