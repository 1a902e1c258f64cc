"""A small modality simulator: C-ECHO and C-STORE of Part-10 files, for users without dcmtk.

Each file is sent exactly as stored (pynetdicom's chunked send streams the data set bytes from
the file), in a presentation context for its own SOP class and transfer syntax, so the receiver
sees what a modality would have sent. PS3.8 9.3.2.2 allows at most 128 presentation contexts in
one association; files needing more are sent over further associations.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

# pynetdicom makes its SOP class constants (Verification) at import, out of type checkers'
# sight: https://github.com/pydicom/pynetdicom/issues/558
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.compat.pynetdicom_send import stream_files_from_disk
from dicom_node.errors import AssociationFailed, AssociationRejected, SendAbandoned, UnsendableFile

log = logging.getLogger(__name__)

MAX_CONTEXTS_PER_ASSOCIATION = 128  # PS3.8 9.3.2.2: presentation context IDs are odd, 1-255

# Stream files from disk instead of decoding and re-encoding them (process-wide, set at import:
# every send of this process, DELIVERY's included, streams).
stream_files_from_disk()


@dataclass(frozen=True)
class DicomFile:
    """A Part-10 file to send: the SOP class and transfer syntax of its presentation context.

    ``from_meta``: the file is streamed as it is and the C-STORE request names what its file
    meta names (as dcmtk's storescu does). Otherwise the data set, of the same SOP class but
    naming another instance than the meta (or the meta none), is sent decoded, so that the
    request names the instance the data set is.
    """

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    from_meta: bool = True

    @property
    def context(self) -> tuple[str, str]:
        return self.sop_class_uid, self.transfer_syntax_uid


@dataclass
class SendReport:
    """What a send did, per file: the status the peer returned or why it was skipped.

    ``on_outcome`` (``"sent"``, ``"failed"`` or ``"skipped"``, the file, why) is called as
    each file's outcome is known, so that a long send can say what it does as it goes.
    """

    sent: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    on_outcome: Callable[[str, Path, str], None] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def add(self, outcome: str, path: Path, why: str = "") -> None:
        if outcome == "sent":
            self.sent.append(path)
        else:
            getattr(self, outcome).append((path, why))
        if self.on_outcome is not None:
            self.on_outcome(outcome, path, why)


def find_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every file under named folders (recursive, sorted)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def inspect_file(path: Path) -> DicomFile:
    """The presentation context a Part-10 file is sent in: SOP class and transfer syntax from
    its file meta (PS3.10 7.1), the SOP class from the data set only where the meta lacks it.

    Raises InvalidDicomError for a file that is not Part-10 and :class:`UnsendableFile` for one
    that names no SOP class, SOP instance or transfer syntax.
    """
    meta = read_file_meta_info(path)
    syntax = meta.get("TransferSyntaxUID")
    if not syntax:
        raise UnsendableFile("no Transfer Syntax UID in the file meta")
    meta_class, meta_instance = (meta.get(f"MediaStorageSOP{k}UID") for k in ("Class", "Instance"))
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        data_class, data_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    except Exception:  # RecursionError included; pydicom's text may quote the file's values
        if not (meta_class and meta_instance):
            raise
        # A data set pydicom cannot read is still sent as it is, by its file meta, as storescu
        # sends it: whether it is acceptable is the receiver's to say (the node refuses it).
        log.debug("%s: data set not readable, sent by its file meta", path, exc_info=True)
        data_class = data_instance = None
    sop_class = meta_class or data_class
    if not sop_class:
        raise UnsendableFile(
            "no SOP Class UID and SOP Instance UID in the file meta or in the data set"
        )
    # pynetdicom streams a file by its meta's class and instance: only a meta naming both and
    # agreeing with the data set's instance can be streamed; otherwise the data set is sent
    # decoded, so that the request names what the data set holds.
    other_instance = data_class == sop_class and data_instance and data_instance != meta_instance
    if meta_class and meta_instance and not other_instance:
        return DicomFile(path, str(sop_class), str(syntax))
    if data_class == sop_class and data_instance:
        return DicomFile(path, str(sop_class), str(syntax), from_meta=False)
    raise UnsendableFile("no SOP Instance UID of its SOP class in the file meta or the data set")


def _batches(files: list[DicomFile]) -> Iterator[list[DicomFile]]:
    """Split files into groups that each need at most 128 presentation contexts."""
    batch: list[DicomFile] = []
    contexts: set[tuple[str, str]] = set()
    for f in files:
        if f.context not in contexts and len(contexts) == MAX_CONTEXTS_PER_ASSOCIATION:
            yield batch
            batch, contexts = [], set()
        batch.append(f)
        contexts.add(f.context)
    if batch:
        yield batch


def requestor_ae(calling_aet: str, *, timeout_s: float) -> AE:
    """An AE that requests associations as ``calling_aet``, every timeout at ``timeout_s``."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def _associate(
    ae: AE, host: str, port: int, called_aet: str, tls: tuple[ssl.SSLContext, str] | None = None
) -> Association:
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls)
    if not assoc.is_established:
        raise_unestablished(assoc, f"{called_aet} at {host}:{port}")
    return assoc


def raise_unestablished(assoc: Association, peer: str) -> NoReturn:
    """Why an association was not established: rejected (permanent when the peer says so,
    PS3.8 7.1.1.9) or failed (refused, aborted, no answer)."""
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        answer = assoc.acceptor.primitive
        raise AssociationRejected(
            f"{peer} rejected the association ({answer.result_str}, {answer.source_str}:"
            f" {answer.reason_str})",
            permanent=answer.result == 0x01,
        )
    raise AssociationFailed(f"association with {peer} failed (refused, aborted or no answer)")


def echo(
    host: str,
    port: int,
    *,
    calling_aet: str = "DICOMNODE_SCU",
    called_aet: str = "DICOMNODE",
    timeout_s: float = 30.0,
) -> int:
    """C-ECHO (PS3.7 9.1.5); returns the peer's status."""
    ae = requestor_ae(calling_aet, timeout_s=timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, called_aet)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise AssociationFailed("no C-ECHO response (timeout or abort)")
    return int(status.Status)


def send(
    paths: Iterable[Path],
    host: str,
    port: int,
    *,
    calling_aet: str = "DICOMNODE_SCU",
    called_aet: str = "DICOMNODE",
    timeout_s: float = 60.0,
    tls: tuple[ssl.SSLContext, str] | None = None,
    on_outcome: Callable[[str, Path, str], None] | None = None,
) -> SendReport:
    """C-STORE every DICOM file under ``paths``; non-DICOM files are reported as skipped,
    files that cannot be sent or were refused as failed, and the send goes on past them.

    One association per batch of at most 128 presentation contexts, each context exactly a
    sent file's SOP class and transfer syntax; ``tls`` is (client context, server name);
    ``on_outcome`` is :attr:`SendReport.on_outcome`. Raises :class:`SendAbandoned` when no
    association can be made for files still to send.
    """
    report = SendReport(on_outcome=on_outcome)
    files: list[DicomFile] = []
    for path in find_files(paths):
        try:
            files.append(inspect_file(path))
        except InvalidDicomError as exc:
            report.add("skipped", path, f"not a DICOM Part-10 file: {exc}")
        except UnsendableFile as exc:
            report.add("failed", path, str(exc))
        except OSError as exc:
            report.add("failed", path, f"cannot be read: {exc.strerror or exc}")
        except Exception as exc:  # a broken file: pydicom's text may quote its values
            log.debug("%s cannot be read", path, exc_info=True)
            report.add("failed", path, f"cannot be read as DICOM ({type(exc).__name__})")
    ae = requestor_ae(calling_aet, timeout_s=timeout_s)
    for batch in _batches(files):
        contexts = sorted({f.context for f in batch})
        ae.requested_contexts = [build_context(c, [ts]) for c, ts in contexts]
        assoc: Association | None = None
        try:
            for number, f in enumerate(batch):
                for last_try in (False, True):
                    if assoc is None or not assoc.is_established:
                        # First file, or the association was aborted: go on in a new one.
                        try:
                            assoc = _associate(ae, host, port, called_aet, tls)
                        except AssociationFailed as exc:
                            for rest in batch[number:]:
                                report.add("failed", rest.path, f"not sent: {exc}")
                            raise SendAbandoned(str(exc), report) from exc
                    if _store_one(assoc, f, report, last_try=last_try):
                        break
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
    return report


def _store_one(assoc: Association, f: DicomFile, report: SendReport, *, last_try: bool) -> bool:
    """C-STORE one file and report its outcome; False, reporting nothing, when no response
    came and this was not the last try.

    A C-STORE with no response is tried once more on a new association (pynetdicom aborts
    the one it timed out on): a repeated instance is a duplicate to any SCP (PS3.4 B.2.3), and
    pynetdicom's requestor can lose a response that comes back very fast to its reactor
    thread, which drops it as an "unexpected" message while send_c_store waits for it until
    the DIMSE timeout (https://github.com/pydicom/pynetdicom/issues/875)."""
    try:
        # Streamed, the C-STORE request names what the file meta names.
        payload = f.path if f.from_meta else dcmread(f.path)
        status = assoc.send_c_store(payload)
    except ValueError as exc:  # no accepted presentation context for this file
        report.add("failed", f.path, str(exc))
        return True
    except Exception as exc:  # pydicom's or pynetdicom's text may quote the file's values
        log.debug("C-STORE of %s failed", f.path, exc_info=True)
        report.add("failed", f.path, f"not sent ({type(exc).__name__})")
        return True
    code = int(status.Status) if "Status" in status else None
    if code is None and not last_try:
        log.warning("no C-STORE response for %s: sending it again", f.path.name)
        return False
    if code is None:
        report.add("failed", f.path, "no response (timeout or abort)")
    elif code == 0x0000:
        report.add("sent", f.path)
    elif code & 0xF000 == 0xB000:  # Warning, PS3.4 B.2.3: stored, perhaps coerced
        log.warning("%s stored with warning status 0x%04X", f.path.name, code)
        report.add("sent", f.path)
    else:
        report.add("failed", f.path, f"status 0x{code:04X}")
    return True
