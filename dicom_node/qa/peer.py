"""qa's DICOM side: where the node is, and the Storage SCP the node's results come back to.

qa calls the node under its own AE title (C-ECHO and C-STORE through :mod:`dicom_node.scu`)
and listens where the node's ``peers`` entry for that title says, so that the results travel
the way they would to a PACS.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from dicom_node.config import NodeConfig

__all__ = [
    "QA_AE_TITLE",
    "Received",
    "ResultReceiver",
    "address_towards",
    "is_local",
    "node_address",
]

log = logging.getLogger(__name__)

QA_AE_TITLE = "DICOMNODE_QA"

# The Structured Report storage classes, whichever the node writes (PS3.6 Table A-1 numbers
# them all under this root; pydicom lists them one by one).
SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def is_local(host: str) -> bool:
    """Whether ``host`` is an address of this machine (one we can bind to)."""
    try:
        address = ipaddress.ip_address(host)
        if address.is_loopback or address.is_unspecified:
            return True
    except ValueError:
        if host == "localhost":
            return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def node_address(config: NodeConfig, host: str | None, port: int | None) -> tuple[str, int]:
    """Where the node listens, as reachable from here: a wildcard bind is reached on loopback."""
    listen = config.scp.host
    default = "127.0.0.1" if listen in ("0.0.0.0", "::", "") else listen
    return host or default, port or config.scp.port


def address_towards(host: str) -> str:
    """Our own address as the node at ``host`` would reach it (for the suggested peers entry)."""
    if is_local(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 104))  # no packet is sent: this only picks the outgoing interface
            return str(s.getsockname()[0])
    except OSError:
        return "<this machine's address>"


@dataclass(frozen=True)
class Received:
    """One object the node delivered, kept as a Part-10 file."""

    path: Path
    sop_class_uid: str
    study_uid: str
    association: int
    at: float

    @property
    def kind(self) -> str:
        if self.sop_class_uid == SegmentationStorage:
            return "SEG"
        if self.sop_class_uid.startswith(SR_STORAGE_PREFIX):
            return "SR"
        return "SC" if self.sop_class_uid == SecondaryCaptureImageStorage else self.sop_class_uid


class ResultReceiver:
    """A Storage SCP (PS3.4 B.2) on pynetdicom's event handlers that keeps every instance the
    node sends as a file, and notes which associations have ended (PS3.8 7.2 A-RELEASE): one
    delivery's objects travel in one association, so a released one has brought them all."""

    def __init__(self, ae_title: str, folder: Path) -> None:
        self.ae_title = ae_title
        self.folder = folder
        self._lock = threading.Lock()
        self._received: list[Received] = []
        # Associations by a serial number of ours: id() of an ended one may be reused.
        self._serials: dict[int, int] = {}
        self._counter = itertools.count()
        self._ended: set[int] = set()
        self._server: Any = None

    def start(self, host: str, port: int) -> None:
        """Listen on (host, port); raises OSError when the port cannot be bound."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.events import EventHandlerType

        # pynetdicom makes its SOP class constants (Verification) at import, out of type
        # checkers' sight: https://github.com/pydicom/pynetdicom/issues/558
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.folder.mkdir(parents=True, exist_ok=True)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
        ]
        self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)

    def listen(self, host: str, port: int) -> str:
        """Start on the peers entry's address, or on every interface when that address is not
        one of ours (a name the node resolves differently, a NAT address); returns the bound
        address."""
        bind = host if is_local(host) else "0.0.0.0"
        self.start(bind, port)
        return bind

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            header = dcmread(BytesIO(data), stop_before_pixels=True)
            with self._lock:
                if id(event.assoc) not in self._serials:
                    self._serials[id(event.assoc)] = next(self._counter)
                serial = self._serials[id(event.assoc)]
                path = self.folder / f"{len(self._received) + 1:04d}.dcm"
                path.write_bytes(data)
                self._received.append(
                    Received(
                        path,
                        str(header.SOPClassUID),
                        str(header.StudyInstanceUID),
                        serial,
                        time.monotonic(),
                    )
                )
        except Exception as exc:  # the node must hear a failure status, not a dropped link
            log.warning("could not keep a delivered instance: %s", exc)
            return 0xC000  # Cannot understand, PS3.4 B.2.3
        log.debug("received %s", header.SOPInstanceUID)
        return 0x0000

    def _on_ended(self, event: Any) -> None:
        with self._lock:
            serial = self._serials.pop(id(event.assoc), None)
            if serial is not None:
                self._ended.add(serial)

    def of_study(self, study_uid: str) -> list[Received]:
        with self._lock:
            return [r for r in self._received if r.study_uid == study_uid]

    def settled(self, study_uid: str) -> bool:
        """Something of the study arrived and every association that carried it has ended."""
        with self._lock:
            carried = {r.association for r in self._received if r.study_uid == study_uid}
            return bool(carried) and carried <= self._ended
