"""Cluster mode's data movement: a job's inputs to the object store before it is dispatched,
from it to a worker's scratch folder, results back, and the node's local copies of them.

Object keys (:mod:`dicom_node.objects`; hashed UIDs and job numbers only):

- ``inputs/<study key>/<sha256>``: one stored instance, content-addressed, so immutable: a
  resent or reused instance is uploaded once, and an attempt never reads another's bytes.
- ``jobs/<job id>/manifest.json``: what a job's inputs are (:class:`Manifest`), written after
  every input is in the store, so a manifest that exists is complete; then the job is marked
  staged (:meth:`JobStore.mark_staged`) and only then dispatched.
- ``results/<job id>/attempt-<n>/...``: a worker's result files, under the same relative paths
  the embedded node records under its data folder (:func:`upload_tree`, :func:`materialize`).

:func:`prestage_open_series` sends instances while their series is still open (the node's
sweeper), so that staging at completion only hashes, lists and writes the manifest.

Retention removes a study's inputs (:func:`purge_study`) and a job's manifest and results
(:func:`purge_job`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from dicom_node.algorithm import SeriesInput
from dicom_node.database import RESULTS_DIR, Database
from dicom_node.errors import InputError, ObjectCorrupt
from dicom_node.infer import series_input
from dicom_node.jobs import Job, JobStore
from dicom_node.objects import ObjectStore, check_key
from dicom_node.priors import study_of_series
from dicom_node.store import store_key

log = logging.getLogger(__name__)

__all__ = [
    "Manifest",
    "StagedFile",
    "fetch_inputs",
    "file_sha256",
    "input_key",
    "manifest_key",
    "materialize",
    "materialize_all",
    "prestage_open_series",
    "purge_job",
    "purge_study",
    "read_manifest",
    "stage_job",
    "upload_tree",
]

INPUTS = "inputs"
JOBS = "jobs"
TRANSFER_THREADS = 16  # parallel uploads and downloads: a CT is hundreds of 0.5 MB objects

T = TypeVar("T")
R = TypeVar("R")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_key(study_uid: str, sha256: str) -> str:
    return f"{INPUTS}/{store_key(study_uid)}/{sha256}"


def manifest_key(job_id: int) -> str:
    return f"{JOBS}/{job_id}/manifest.json"


@dataclass(frozen=True)
class StagedFile:
    """One input instance: its path under the node's data folder (which orders a series as the
    embedded worker orders it), its object key, content hash and size."""

    path: str
    key: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        check_key(self.key)
        _relative(self.path)
        if len(self.sha256) != 64 or set(self.sha256) - set("0123456789abcdef"):
            raise ValueError(f"staged file {self.key!r}: {self.sha256!r} is not a SHA-256")


@dataclass(frozen=True)
class Manifest:
    """A staged job's inputs: by input name (role, or "series"), its series UID and files.

    Stored as ``{"job_id", "series": {name: uid}, "inputs": {name: [{path, key, sha256,
    size}]}}``; the series UIDs are in the object's body, never in a key.
    """

    job_id: int
    series: Mapping[str, str]
    inputs: Mapping[str, tuple[StagedFile, ...]]

    def __post_init__(self) -> None:
        if set(self.series) != set(self.inputs):
            raise ValueError(f"manifest of job {self.job_id}: series and inputs name other roles")
        if not all(self.inputs.values()):
            raise ValueError(f"manifest of job {self.job_id}: an input has no files")

    @property
    def files(self) -> list[StagedFile]:
        return [f for files in self.inputs.values() for f in files]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "job_id": self.job_id,
                "series": dict(self.series),
                "inputs": {name: [asdict(f) for f in files] for name, files in self.inputs.items()},
            },
            indent=1,
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw: Any = json.loads(data)
            return cls(
                job_id=int(raw["job_id"]),
                series={str(k): str(v) for k, v in raw["series"].items()},
                inputs={
                    str(name): tuple(StagedFile(**f) for f in files)
                    for name, files in raw["inputs"].items()
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ObjectCorrupt(f"a job manifest that cannot be read: {exc}") from exc


def _relative(path: str) -> PurePosixPath:
    """A path under the data folder, refusing one that would leave it (``..``, absolute)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or not pure.parts or ".." in pure.parts:
        raise ValueError(f"{path!r} is not a relative path inside the data folder")
    return pure


def _parallel(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``function`` over ``items`` on a thread pool (I/O bound: boto3 releases the GIL), in
    order; the first exception is raised once every call has finished."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


# --- the node: staging a job -----------------------------------------------------------------


def _upload_missing(objects: ObjectStore, study_uids: set[str], files: Mapping[str, Path]) -> int:
    """Upload the files (by key) that the studies' input prefixes lack; how many. One listing
    per study instead of a HEAD per instance."""
    present = {k for uid in study_uids for k in objects.keys(f"{INPUTS}/{store_key(uid)}/")}
    missing = sorted((key, path) for key, path in files.items() if key not in present)
    _parallel(lambda kp: objects.put_file(*kp), missing)
    return len(missing)


def _study_of(db: Database, series_uid: str) -> str:
    study = study_of_series(db, series_uid)
    if study is None:
        raise InputError(f"series {store_key(series_uid)} is not in the index")
    return study


def stage_job(
    job: Job, db: Database, jobs: JobStore, data_dir: Path, objects: ObjectStore
) -> Manifest:
    """Put an inference job's inputs in the object store, then its manifest, then mark it
    staged; what is already there (a resent instance, the job staged before) is not sent again.

    The inputs are those its completion saw (received by :meth:`JobStore.completed_at`), as
    the embedded worker reads them (:func:`dicom_node.infer.series_input`); an input of
    another study (a prior, :func:`dicom_node.infer.prior_input`) is taken whole, since a
    prior retrieved from a PACS arrives after the completion that asked for it.
    """
    started = time.perf_counter()
    payload = job.inference
    received_by = jobs.completed_at(job)
    data_dir = data_dir.resolve()
    series = dict(payload.inputs)
    studies = {name: _study_of(db, uid) for name, uid in series.items()}
    own = job.subject_uid if payload.level == "study" else _study_of(db, job.subject_uid)
    local = {
        name: series_input(db, data_dir, uid, received_by if studies[name] == own else None)
        for name, uid in series.items()
    }

    def describe(item: tuple[str, Path]) -> StagedFile:
        name, path = item
        sha256 = file_sha256(path)
        return StagedFile(
            path=path.relative_to(data_dir).as_posix(),
            key=input_key(studies[name], sha256),
            sha256=sha256,
            size=path.stat().st_size,
        )

    items = [(name, path) for name, s in local.items() for path in s.paths]
    described = _parallel(describe, items)
    inputs = {
        name: tuple(f for (n, _), f in zip(items, described, strict=True) if n == name)
        for name in local
    }
    manifest = Manifest(job.id, series, inputs)

    # One listing per study instead of a HEAD per instance.
    uploaded = _upload_missing(
        objects, set(studies.values()), {f.key: data_dir / f.path for f in manifest.files}
    )

    # Last: a manifest that exists names inputs that all exist.
    key = manifest_key(job.id)
    body = manifest.to_json()
    if not (objects.exists(key) and objects.get_bytes(key) == body):
        objects.put_bytes(key, body)
    jobs.mark_staged(job.id)
    log.info(
        "job %d staged: %d file(s), %.1f MB, %d uploaded, in %.2f s",
        job.id,
        len(manifest.files),
        manifest.size / 1e6,
        uploaded,
        time.perf_counter() - started,
    )
    return manifest


def prestage_open_series(
    db: Database, data_dir: Path, objects: ObjectStore, since: float, *, limit: int = 2000
) -> float:
    """Upload the instances of series still open (not yet complete) received after ``since``,
    so that staging at completion finds them there and only hashes, lists and writes the
    manifest: completion to dispatch stays short however large the series (issue 17). Every
    open series is sent, routed or not: bandwidth spent for latency.

    Returns the next call's ``since`` (the newest reception handled). Only an optimisation:
    an instance it misses (one whose series completed meanwhile, one removed meanwhile) is
    uploaded by :func:`stage_job`, which needs nothing from here.
    """
    with db.reading() as conn:
        rows = conn.execute(
            "SELECT i.study_uid, i.path, i.received_at FROM series s"
            " JOIN instances i ON i.series_uid = s.series_uid"
            " WHERE s.completed_at IS NULL AND s.last_received > ? AND i.received_at > ?"
            " ORDER BY i.received_at LIMIT ?",
            (since, since, limit),
        ).fetchall()
    if not rows:
        return since

    def key_of(row: Any) -> tuple[str, Path] | None:
        path = data_dir / _relative(str(row["path"]))
        try:
            return input_key(str(row["study_uid"]), file_sha256(path)), path
        except FileNotFoundError:
            return None  # replaced or removed since the query: nothing to send

    found = [kp for kp in _parallel(key_of, rows) if kp is not None]
    _upload_missing(objects, {str(r["study_uid"]) for r in rows}, dict(found))
    return float(rows[-1]["received_at"])


# --- a worker: inputs in, results out --------------------------------------------------------


def read_manifest(job_id: int, objects: ObjectStore) -> Manifest:
    """A staged job's manifest (:class:`ObjectMissing` when it is not staged, or purged)."""
    manifest = Manifest.from_json(objects.get_bytes(manifest_key(job_id)))
    if manifest.job_id != job_id:
        raise ObjectCorrupt(f"{manifest_key(job_id)} is the manifest of job {manifest.job_id}")
    return manifest


def fetch_inputs(job_id: int, objects: ObjectStore, scratch: Path) -> dict[str, SeriesInput]:
    """A staged job's inputs downloaded under ``scratch`` (at their data-folder paths), each
    checked against its manifest's SHA-256: a mismatch raises :class:`ObjectCorrupt`."""
    manifest = read_manifest(job_id, objects)

    def fetch(staged: StagedFile) -> Path:
        target = scratch / _relative(staged.path)
        objects.get_file(staged.key, target)
        got = file_sha256(target)
        if got != staged.sha256:
            target.unlink(missing_ok=True)
            raise ObjectCorrupt(
                f"object {staged.key!r} of job {job_id} has SHA-256 {got[:16]}...,"
                f" its manifest says {staged.sha256[:16]}..."
            )
        return target

    # One download per distinct path: a series given to two roles is fetched once.
    unique = list({f.path: f for f in manifest.files}.values())
    paths = dict(zip((f.path for f in unique), _parallel(fetch, unique), strict=True))
    inputs = {}
    for name, files in manifest.inputs.items():
        in_order = sorted(files, key=lambda f: f.path)  # as series_input orders them
        inputs[name] = SeriesInput(manifest.series[name], tuple(paths[f.path] for f in in_order))
    return inputs


def upload_tree(folder: Path, objects: ObjectStore, root: Path) -> list[str]:
    """Every file under ``folder``, at the key of its path relative to ``root`` (a worker's
    scratch folder standing for the node's data folder); the keys, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    keys = [p.relative_to(root).as_posix() for p in files]
    _parallel(lambda kp: objects.put_file(*kp), list(zip(keys, files, strict=True)))
    return keys


def materialize(relative: str, data_dir: Path, objects: ObjectStore) -> Path:
    """The node's local copy of a result file recorded at ``relative`` (under the data
    folder), downloaded from the object store on first use, complete or not at all."""
    local = data_dir / _relative(relative)
    if not local.is_file():
        objects.get_file(check_key(relative), local)
    return local


def materialize_all(relatives: Iterable[str], data_dir: Path, objects: ObjectStore) -> list[Path]:
    """:func:`materialize` of several files at once (a SEG, an SR and their SCs)."""
    return _parallel(lambda r: materialize(r, data_dir, objects), list(relatives))


# --- retention -------------------------------------------------------------------------------


def purge_study(study_uid: str, objects: ObjectStore) -> int:
    """Remove a study's staged inputs; how many objects."""
    return objects.delete_prefix(f"{INPUTS}/{store_key(study_uid)}/")


def purge_job(job_id: int, objects: ObjectStore) -> int:
    """Remove a job's manifest and every attempt's results; how many objects."""
    return objects.delete_prefix(f"{JOBS}/{job_id}/") + objects.delete_prefix(
        f"{RESULTS_DIR}/{job_id}/"
    )
