"""A DICOM Upper Layer peer by hand (PS3.8 9.3), for tests that must say what no well-behaved
library would: hostile PDUs, data sets split at any byte, associations interleaved."""

from __future__ import annotations

import socket
import struct

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage
from pynetdicom.sop_class import Verification

from dicom_node.phantoms import CtPhantomSpec, ct_series
from tests.support.node import NodeProcess

# PS3.8 9.3.1 PDU types.
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
RELEASE_RQ, RELEASE_RP, ABORT = 0x05, 0x06, 0x07
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
VERIFICATION_CONTEXT, CT_CONTEXT = 1, 3


def item(item_type: int, value: bytes) -> bytes:
    """A variable item (PS3.8 9.3.2.2 ff.): type, reserved, 16-bit length, value."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def associate_rq(calling: str = "HOSTILE", called: str = "DICOMNODE") -> bytes:
    """A valid A-ASSOCIATE-RQ (PS3.8 9.3.2): Verification and CT Image Storage in Implicit
    VR Little Endian, a 16 KiB maximum PDU length."""
    items = item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract in (
        (VERIFICATION_CONTEXT, Verification),
        (CT_CONTEXT, CTImageStorage),
    ):
        items += item(
            0x20,
            struct.pack(">BBBB", context_id, 0, 0, 0)
            + item(0x30, str(abstract).encode())
            + item(0x40, IMPLICIT_VR_LE.encode()),
        )
    items += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4.5.6"))
    fixed = struct.pack(
        ">HH16s16s32s", 1, 0, called.ljust(16).encode(), calling.ljust(16).encode(), b""
    )
    return pdu(ASSOCIATE_RQ, fixed + items)


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF with one PDV; control bit 0: command, bit 1: last fragment (PS3.8 E.2)."""
    return pdu(P_DATA_TF, struct.pack(">IBB", len(data) + 2, context_id, control) + data)


def implicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    return fp.getvalue()


def c_store_rq(ds: Dataset, message_id: int = 1) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1) for ``ds``, group length first."""
    command = Dataset()
    command.AffectedSOPClassUID = ds.SOPClassUID
    command.CommandField = 0x0001
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = ds.SOPInstanceUID
    body = implicit_le(command)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def c_store_pdus(ds: Dataset, fragment: int = 2048) -> list[bytes]:
    """The P-DATA-TFs of a C-STORE of ``ds``: the command, then the data set in fragments."""
    data = implicit_le(ds)
    pdus = [p_data(CT_CONTEXT, 0x03, c_store_rq(ds))]
    chunks = [data[i : i + fragment] for i in range(0, len(data), fragment)]
    for number, chunk in enumerate(chunks, 1):
        pdus.append(p_data(CT_CONTEXT, 0x02 if number == len(chunks) else 0x00, chunk))
    return pdus


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU from the node as (type, body); None when it closed the connection."""
    header = recv_exactly(sock, 6)
    if len(header) < 6:
        return None
    pdu_type, _, length = struct.unpack(">BBI", header)
    return pdu_type, recv_exactly(sock, length)


def connect(node: NodeProcess, timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(node: NodeProcess) -> socket.socket:
    """A raw connection with an accepted association."""
    sock = connect(node)
    sock.sendall(associate_rq())
    reply = read_pdu(sock)
    assert reply is not None and reply[0] == ASSOCIATE_AC, reply
    return sock


def store_on(sock: socket.socket, ds: Dataset) -> int:
    """C-STORE ``ds`` on a raw association; the response status."""
    for data in c_store_pdus(ds):
        sock.sendall(data)
    reply = read_pdu(sock)
    assert reply is not None and reply[0] == P_DATA_TF, reply
    # One PDV: item length (4), context (1), control header (1), the command set.
    return int(read_dataset(DicomBytesIO(reply[1][6:]), True, True).Status)


def raw_store(node: NodeProcess, ds: Dataset) -> int:
    """C-STORE ``ds`` over a raw association and release it; the response status."""
    with associate(node) as sock:
        status = store_on(sock, ds)
        sock.sendall(pdu(RELEASE_RQ, b"\0\0\0\0"))
        assert (read_pdu(sock) or (None,))[0] == RELEASE_RP
        return status


def small_slice(**attributes: object) -> Dataset:
    ds = next(ct_series(CtPhantomSpec(slices=1, rows=64, columns=64)))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def assert_index_consistent(node: NodeProcess) -> None:
    """Every instance row names a file that exists, every file has a row, and nothing is left
    in the store's temporary area (where a write in progress lives)."""
    rows = {r["path"] for r in node.query("SELECT path FROM instances")}
    files = {
        p.relative_to(node.data_dir).as_posix()
        for p in (node.data_dir / "instances").rglob("*")
        if p.is_file()
    }
    assert rows == files, f"rows without files: {rows - files}; files without rows: {files - rows}"
    assert list((node.data_dir / "tmp").iterdir()) == []
