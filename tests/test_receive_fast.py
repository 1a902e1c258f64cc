"""The fast path (dicom_node.receive): P-DATA read straight from the accepted association.

The command codec is held to pynetdicom's DIMSE messages. Against a running node, data sets
split at arbitrary bytes over many PDUs and PDVs, PDUs from 4 KB to 1 MB, interleaved
associations and mutated P-DATA must each leave exactly what was acknowledged, byte for byte,
and nothing else; the fast-path counter in /metrics shows the fast path, not pynetdicom,
answered.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from dicom_node.errors import ProtocolError
from dicom_node.phantoms import CtPhantomSpec, ct_series, write_ct_series
from dicom_node.receive import (
    C_ECHO_RQ,
    STATUS_UNRECOGNIZED_OPERATION,
    Command,
    decode_command,
    encode_command,
    encode_response,
    p_data_pdus,
)
from dicom_node.receive import C_STORE_RQ as STORE_FIELD
from tests.support.http import metrics
from tests.support.node import NodeProcess, wait_until
from tests.support.upper_layer import (
    ASSOCIATE_AC,
    CT_CONTEXT,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ,
    assert_index_consistent,
    associate,
    associate_rq,
    c_store_rq,
    connect,
    implicit_le,
    item,
    pdu,
    read_pdu,
    small_slice,
)

SEED = 20261207
FAST = ("dicom_node_instances_received_fast_path_total", ())

uids = st.builds(
    lambda parts: ".".join(str(p) for p in parts),
    st.lists(st.integers(0, 10**12), min_size=2, max_size=6),
).filter(lambda uid: len(uid) <= 64)


# -- the command codec, against pynetdicom's -------------------------------------------------------


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(
    message_id=st.integers(0, 0xFFFF),
    status=st.sampled_from([0x0000, 0xA700, 0xA900, 0xC000, 0x0211, 0xB000]),
    sop_class=uids,
    sop_instance=uids,
)
def test_responses_are_byte_for_byte_pynetdicoms(
    message_id: int, status: int, sop_class: str, sop_instance: str
) -> None:
    store = C_STORE()
    store.MessageIDBeingRespondedTo = message_id
    store.AffectedSOPClassUID = sop_class
    store.AffectedSOPInstanceUID = sop_instance
    store.Status = status
    theirs = C_STORE_RSP()
    theirs.primitive_to_message(store)
    request = Command(STORE_FIELD, message_id, True, sop_class, sop_instance, 0, "")
    assert encode_response(request, status) == encode(theirs.command_set, True, True)

    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = message_id
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.Status = status
    theirs_echo = C_ECHO_RSP()
    theirs_echo.primitive_to_message(echo)
    request = Command(C_ECHO_RQ, message_id, False, "1.2.840.10008.1.1", "", 0, "")
    assert encode_response(request, status) == encode(theirs_echo.command_set, True, True)


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(
    message_id=st.integers(0, 0xFFFF),
    priority=st.sampled_from([0, 1, 2]),
    sop_class=uids,
    sop_instance=uids,
    originator=st.sampled_from(["", "MOVER", "A" * 16]),
)
def test_requests_decode_as_pynetdicom_encodes_them(
    message_id: int, priority: int, sop_class: str, sop_instance: str, originator: str
) -> None:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = priority
    if originator:
        primitive.MoveOriginatorApplicationEntityTitle = originator
        primitive.MoveOriginatorMessageID = 1
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = Command.decode(encode(message.command_set, True, True))
    assert (command.field, command.message_id, command.priority) == (1, message_id, priority)
    assert (command.affected_sop_class, command.affected_sop_instance) == (
        sop_class,
        sop_instance,
    )
    assert command.move_originator == originator


@pytest.mark.unit
@pytest.mark.parametrize("max_pdu", [0, 7, 8, 16, 100, 4096])
def test_responses_fit_the_peers_maximum_pdu(max_pdu: int) -> None:
    command = encode_response(
        Command(STORE_FIELD, 3, True, CTImageStorage, "1.2.3.4", 0, ""), 0xA900
    )
    stream, fragments = p_data_pdus(5, command, max_pdu), b""
    while stream:
        kind, length = struct.unpack(">BxI", stream[:6])
        assert kind == P_DATA_TF and (max_pdu == 0 or length <= max_pdu)
        body, stream = stream[6 : 6 + length], stream[6 + length :]
        item_length, context, control = struct.unpack(">IBB", body[:6])
        assert (item_length, context) == (len(body) - 4, 5)
        fragments += body[6:]
        assert control & 0x01 and bool(control & 0x02) == (not stream)
    assert fragments == command


@pytest.mark.unit
@pytest.mark.parametrize(
    "encoded",
    [
        b"\x00\x00\x00\x01",  # ends inside an element header
        struct.pack("<HHI", 0x0008, 0x0016, 2) + b"12",  # not group 0000
        struct.pack("<HHI", 0x0000, 0x0100, 100) + b"\x01\x00",  # runs past the end
    ],
)
def test_what_is_not_a_command_set_is_a_protocol_error(encoded: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(encoded)


@pytest.mark.unit
def test_a_command_without_a_command_field_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="0100"):
        Command.decode(encode_command([(0x0110, 1), (0x0800, 0x0101)]))


# -- a running node --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    started = NodeProcess(
        tmp_path_factory.mktemp("fast"),
        {
            # Room for a 1 MB PDU; completion by association end must not start jobs here.
            "scp": {"max_pdu_size": 2 << 20, "network_timeout_s": 5, "max_associations": 40},
            "worker": {"enabled": False},
            "assembly": {"series_quiet_seconds": 600, "study_quiet_seconds": 600},
        },
    ).start()
    yield started
    started.stop()


def fast_count(node: NodeProcess) -> float:
    return metrics(node.http_url).get(FAST, 0.0)


def stored_dataset(node: NodeProcess, sop_instance_uid: str) -> bytes:
    """The data set of a stored instance, as its file holds it behind the file meta."""
    rows = node.query("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
    assert rows, "not indexed"
    data = (node.data_dir / rows[0]["path"]).read_bytes()
    return data[144 + struct.unpack("<I", data[140:144])[0] :]


def pdv(context: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context, control) + data


def split(rng: random.Random, data: bytes, most: int) -> list[bytes]:
    """``data`` cut at random places into pieces of 1 to ``most`` bytes."""
    pieces, start = [], 0
    while start < len(data):
        size = rng.randint(1, most)
        pieces.append(data[start : start + size])
        start += size
    return pieces


def fragmented(rng: random.Random, ds: Dataset) -> list[bytes]:
    """A C-STORE of ``ds`` as P-DATA-TFs holding random runs of randomly cut PDVs: the
    command itself in fragments, then the data set (PS3.8 E.2)."""
    pdvs = []
    for control, data, most in (
        (0x01, c_store_rq(ds), 40),
        (0x00, implicit_le(ds), rng.choice((1, 7, 500, 5000, 70000))),
    ):
        pieces = split(rng, data, most)
        pdvs += [
            pdv(CT_CONTEXT, control | (0x02 if n == len(pieces) - 1 else 0), piece)
            for n, piece in enumerate(pieces)
        ]
    pdus, start = [], 0
    while start < len(pdvs):
        count = rng.randint(1, 40)
        pdus.append(pdu(P_DATA_TF, b"".join(pdvs[start : start + count])))
        start += count
    return pdus


def status_of(reply: tuple[int, bytes] | None) -> int:
    assert reply is not None and reply[0] == P_DATA_TF, reply
    return int.from_bytes(decode_command(reply[1][6:])[0x0900], "little")


def release(sock: socket.socket) -> None:
    sock.sendall(pdu(RELEASE_RQ, bytes(4)))
    assert (read_pdu(sock) or (None,))[0] == RELEASE_RP


def store_and_release(sock: socket.socket, rng: random.Random) -> None:
    """C-STORE a new small slice, cut at random, on an association; Success; release it."""
    for data in fragmented(rng, small_slice()):
        sock.sendall(data)
    assert status_of(read_pdu(sock)) == 0
    release(sock)


@pytest.mark.integration
def test_a_data_set_cut_anywhere_is_stored_byte_for_byte(node: NodeProcess) -> None:
    rng = random.Random(SEED)
    before = fast_count(node)
    sent: dict[str, bytes] = {}
    with associate(node) as sock:
        for case in range(30):
            ds = small_slice()
            sent[ds.SOPInstanceUID] = implicit_le(ds)
            for data in fragmented(rng, ds):
                sock.sendall(data)
            assert status_of(read_pdu(sock)) == 0, f"case {case} (seed {SEED})"
        release(sock)
    for uid, data in sent.items():
        assert stored_dataset(node, uid) == data
    assert fast_count(node) - before == len(sent)
    assert_index_consistent(node)


@pytest.mark.integration
@pytest.mark.parametrize("pdu_size", [4096, 4099, 16384, 65535, 131072, 1 << 20])
def test_pdus_from_4_kb_to_1_mb(node: NodeProcess, pdu_size: int) -> None:
    ds = next(ct_series(CtPhantomSpec(slices=1)))  # 512 x 512: half a megabyte of pixels
    data = implicit_le(ds)
    with associate(node) as sock:
        sock.sendall(pdu(P_DATA_TF, pdv(CT_CONTEXT, 0x03, c_store_rq(ds))))
        for start in range(0, len(data), pdu_size - 6):
            piece = data[start : start + pdu_size - 6]
            last = start + pdu_size - 6 >= len(data)
            sock.sendall(pdu(P_DATA_TF, pdv(CT_CONTEXT, 0x02 if last else 0x00, piece)))
        assert status_of(read_pdu(sock)) == 0
        release(sock)
    assert stored_dataset(node, ds.SOPInstanceUID) == data


@pytest.mark.integration
@pytest.mark.parametrize("send_pdu", ["4096", "131072"])
def test_storescu_sending_small_and_large_pdus(
    node: NodeProcess, tmp_path: Path, send_pdu: str
) -> None:
    files = write_ct_series(tmp_path, CtPhantomSpec(slices=5, rows=128, columns=128))
    result = node.storescu("--max-send-pdu", send_pdu, files=files)
    assert result.returncode == 0, result.stderr
    node.assert_kept(files, byte_identical=True)


@pytest.mark.integration
def test_interleaved_associations(node: NodeProcess) -> None:
    """Eight associations at once, their PDUs sent in turn, one PDU of each at a time."""
    rng = random.Random(SEED + 1)
    before = fast_count(node)
    sockets = [associate(node) for _ in range(8)]
    datasets = [[small_slice() for _ in range(3)] for _ in sockets]
    streams = [[p for ds in batch for p in fragmented(rng, ds)] for batch in datasets]
    try:
        # Responses are read after the last instance of each: a few hundred bytes each, far
        # below what the sockets buffer, so that the node never waits on us.
        while any(streams):
            for sock, stream in zip(sockets, streams, strict=True):
                if stream:
                    sock.sendall(stream.pop(0))
        for sock, batch in zip(sockets, datasets, strict=True):
            assert [status_of(read_pdu(sock)) for _ in batch] == [0] * len(batch)
            release(sock)
    finally:
        for sock in sockets:
            sock.close()
    for batch in datasets:
        for ds in batch:
            assert stored_dataset(node, ds.SOPInstanceUID) == implicit_le(ds)
    assert fast_count(node) - before == 24
    assert_index_consistent(node)


@pytest.mark.integration
def test_the_asynchronous_operations_window_is_answered_with_one(node: NodeProcess) -> None:
    request = bytearray(associate_rq())
    async_ops = item(0x53, struct.pack(">HH", 16, 16))  # PS3.7 D.3.3.3: 16 each way, asked
    user_info = request.rindex(b"\x50\x00")  # the user information item is the last item
    old_length = struct.unpack(">H", request[user_info + 2 : user_info + 4])[0]
    request[user_info + 2 : user_info + 4] = struct.pack(">H", old_length + len(async_ops))
    request += async_ops
    request[2:6] = struct.pack(">I", len(request) - 6)
    with connect(node) as sock:
        sock.sendall(bytes(request))
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == ASSOCIATE_AC
        assert item(0x53, struct.pack(">HH", 1, 1)) in reply[1]
        store_and_release(sock, random.Random(SEED))


@pytest.mark.integration
def test_other_requests_are_unrecognized_and_the_association_goes_on(node: NodeProcess) -> None:
    find = encode_command([(0x0002, CTImageStorage), (0x0100, 0x0020), (0x0110, 5),
                           (0x0700, 0), (0x0800, 0x0000)])  # fmt: skip
    with associate(node) as sock:
        sock.sendall(pdu(P_DATA_TF, pdv(CT_CONTEXT, 0x03, find)))
        sock.sendall(pdu(P_DATA_TF, pdv(CT_CONTEXT, 0x02, implicit_le(Dataset()))))
        reply = read_pdu(sock)
        assert status_of(reply) == STATUS_UNRECOGNIZED_OPERATION
        assert reply is not None
        assert int.from_bytes(decode_command(reply[1][6:])[0x0100], "little") == 0x8020
        store_and_release(sock, random.Random(SEED))


@pytest.mark.integration
def test_a_release_inside_a_data_set_stores_nothing(node: NodeProcess) -> None:
    ds = small_slice()
    with associate(node) as sock:
        pdus = fragmented(random.Random(SEED), ds)
        for data in pdus[: max(2, len(pdus) // 2)]:
            sock.sendall(data)
        release(sock)
    assert not node.query(
        "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,)
    )
    assert_index_consistent(node)


def _mutated(rng: random.Random, pdus: list[bytes]) -> tuple[str, list[bytes]]:
    """A C-STORE's PDUs with one thing broken in P-DATA."""
    kind = rng.choice(("flip", "pdv-length", "context", "control", "truncate", "command"))
    n = rng.randrange(len(pdus))
    data = bytearray(pdus[n])
    if kind == "flip":
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    elif kind == "pdv-length":
        data[6:10] = struct.pack(">I", rng.choice((0, 1, len(data), 0xFFFFFFFF, rng.randrange(64))))
    elif kind == "context":
        data[10] = rng.choice((0, 2, 5, 255))
    elif kind == "control":
        data[11] = rng.randint(0, 255)
    elif kind == "truncate":
        return kind, [*pdus[:n], bytes(data[: rng.randrange(1, len(data))])]
    else:  # the command replaced by noise
        data = bytearray(pdu(P_DATA_TF, pdv(CT_CONTEXT, 0x03, rng.randbytes(rng.randint(0, 90)))))
    return kind, [*pdus[:n], bytes(data), *pdus[n + 1 :]]


@pytest.mark.integration
def test_mutated_p_data(node: NodeProcess) -> None:
    """Broken P-DATA from 60 seeded cases: the node answers, aborts or waits, never stores a
    partial file, keeps its index and files in agreement, and serves the next association."""
    rng = random.Random(SEED + 2)
    for case in range(60):
        ds = small_slice()
        kind, pdus = _mutated(rng, fragmented(rng, ds))
        with associate(node) as sock:
            sock.settimeout(1.0)
            try:
                for data in pdus:
                    sock.sendall(data)
                read_pdu(sock)
            except OSError:
                pass  # aborted and closed by the node, or no answer to a broken request
        assert node.proc is not None and node.proc.poll() is None, f"case {case} {kind}"
    log = node.log()
    assert "Traceback" not in log, log[-3000:]
    with associate(node) as sock:
        store_and_release(sock, rng)
    wait_until(lambda: not list((node.data_dir / "tmp").iterdir()), 15, "tmp/ emptied", log)
    assert_index_consistent(node)


@pytest.mark.integration
def test_a_connection_that_never_associates_does_not_hold_the_stop(make_node) -> None:
    """Stopping waits for accepted associations only: before, a peer that connected and said
    nothing held the stop for the grace period (30 s) waiting out its ACSE timeout."""
    node = make_node(scp={"acse_timeout_s": 120}, worker={"enabled": False})
    with connect(node):
        assert node.stop(timeout_s=20) == 0
