"""A hostile or broken network peer on loopback: mutated and random PDUs, absurd lengths,
peers that vanish mid-PDU or mid-data set, peers that connect and never speak, and more
associations than the node admits. After every attack the node must be alive, answer C-ECHO,
store a C-STORE, and hold an index whose rows and files agree.

The peer here is a raw socket speaking the Upper Layer protocol (PS3.8 9.3) encoded by hand,
so it can say what no well-behaved library would; the "normal" clients are pynetdicom's.
Random cases come from a seeded generator: a failure names the seed and the case, which
reproduce it.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.node import NodeProcess, closed_by_node
from tests.support.upper_layer import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    CT_CONTEXT,
    P_DATA_TF,
    RELEASE_RQ,
    assert_index_consistent,
    associate,
    associate_rq,
    c_store_pdus,
    c_store_rq,
    connect,
    item,
    p_data,
    pdu,
    raw_store,
    read_pdu,
    recv_exactly,
    small_slice,
    store_on,
)

pytestmark = pytest.mark.integration

# Small timeouts so that the node's own clocks, not the test's patience, end idle peers.
ACSE_TIMEOUT_S = 3.0
NETWORK_TIMEOUT_S = 3.0
TIMEOUTS = {
    "acse_timeout_s": ACSE_TIMEOUT_S,
    "dimse_timeout_s": NETWORK_TIMEOUT_S,
    "network_timeout_s": NETWORK_TIMEOUT_S,
}
# A connection that sent no valid A-ASSOCIATE-RQ keeps its slot for up to the ACSE timeout
# after the peer hung up (pynetdicom waits that long for the request), so the node that
# takes the barrage has room; the limit itself is tested on a node with few slots.
ROOMY = {
    "scp": {**TIMEOUTS, "max_associations": 100},
    "worker": {"enabled": False},
    # Completion by association end is watched below; the quiet timer must not beat it.
    "assembly": {"series_quiet_seconds": 120, "study_quiet_seconds": 120},
}
TIGHT = {"scp": {**TIMEOUTS, "max_associations": 3}, "worker": {"enabled": False}}
# How long past its own timeout the node may take to notice (2 loaded cores).
SLACK_S = 4.0

SEED = 20261123
CASES = 100


def send_and_hang_up(
    node: NodeProcess, data: bytes, then: bytes | None = None, timeout_s: float = 10.0
) -> int | None:
    """Send ``data`` (and, once the node has answered it, ``then``), close our sending side,
    and wait for the node to close its side; the type of the first PDU it answered with (None
    for none). Fails if it keeps the connection open: a peer that has gone must not hold a
    slot."""
    first = None
    with connect(node) as sock:
        try:
            sock.sendall(data)
            if then is not None:
                reply = read_pdu(sock)
                first = reply[0] if reply else None
                sock.sendall(then)
            sock.shutdown(socket.SHUT_WR)
            if first is None:
                header = recv_exactly(sock, 6)
                first = header[0] if header else None
        except TimeoutError:
            raise AssertionError(f"no answer and no close after our EOF: {data!r}") from None
        except OSError:  # reset by the node: it hung up first
            return first
        assert closed_by_node(sock, timeout_s), f"the node kept the connection open: {data!r}"
        return first


# -- what "healthy" means -------------------------------------------------------------------------


def normal_ae() -> AE:
    ae = AE(ae_title="WELLBEHAVED")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    return ae


def echo_status(node: NodeProcess) -> int | None:
    ae = normal_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def store_status(node: NodeProcess, ds: Dataset) -> int | None:
    ae = normal_ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def indexed(node: NodeProcess, sop_instance_uid: str) -> bool:
    rows = node.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
    return bool(rows)


def assert_healthy(node: NodeProcess) -> None:
    assert node.proc is not None and node.proc.poll() is None, f"the node died:\n{node.log()}"
    assert echo_status(node) == 0, node.log()[-3000:]
    ds = small_slice()
    assert store_status(node, ds) == 0, node.log()[-3000:]
    assert indexed(node, ds.SOPInstanceUID)
    assert_index_consistent(node)
    log = node.log()
    # A handler of ours that raised, or a thread that died, is a bug even when the node lives
    # on. Not the connection threads pynetdicom ends by re-raising what broke their protocol
    # machine ("(run_reactor)"): the association is accounted for, see below.
    assert "event handler '_on_" not in log, log[-3000:]
    died = [
        line
        for line in log.splitlines()
        if line.startswith("Exception in thread") and not line.endswith("(run_reactor):")
    ]
    assert not died, died


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    started = NodeProcess(tmp_path_factory.mktemp("hostile"), ROOMY).start()
    yield started
    if started.proc is not None and started.proc.poll() is None:
        started.kill()


# -- the attacks -----------------------------------------------------------------------------------


def test_the_raw_peer_speaks_valid_dicom(node: NodeProcess) -> None:
    """The hand-made PDUs are right, so that what the attacks leave out would otherwise have
    been stored: a raw C-STORE is acknowledged and indexed."""
    ds = small_slice()
    assert raw_store(node, ds) == 0
    assert indexed(node, ds.SOPInstanceUID)
    assert_healthy(node)


def length_fields(request: bytes) -> list[int]:
    """Offsets of every item's and sub-item's 16-bit length in an A-ASSOCIATE-RQ."""
    offsets = []

    def walk(start: int, end: int) -> None:
        while start + 4 <= end:
            item_type, length = (
                request[start],
                struct.unpack(">H", request[start + 2 : start + 4])[0],
            )
            offsets.append(start + 2)
            if item_type == 0x20:  # presentation context: 4 bytes, then sub-items
                walk(start + 8, start + 4 + length)
            elif item_type == 0x50:  # user information: sub-items
                walk(start + 4, start + 4 + length)
            start += 4 + length

    walk(74, len(request))  # the variable items follow the 74-byte fixed part
    return offsets


def _mutations(rng: random.Random, valid: bytes) -> Iterator[tuple[str, bytes, bytes | None]]:
    """Endless varied bad input: flipped bytes in a valid request, truncations, lying
    lengths, unknown PDU types, bare noise, and a valid request answered, then garbage."""
    while True:
        then = None
        kind = rng.choice(("flip", "truncate", "type", "noise", "item-length", "after-accept"))
        data = bytearray(valid)
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        elif kind == "truncate":
            data = data[: rng.randrange(1, len(data))]
        elif kind == "type":
            body = rng.randbytes(rng.randint(0, 300))
            data = bytearray(pdu(rng.randint(0, 255), body))
        elif kind == "noise":
            data = bytearray(rng.randbytes(rng.randint(1, 400)))
        elif kind == "item-length":
            offset = rng.choice(length_fields(valid))
            data[offset : offset + 2] = struct.pack(">H", rng.randint(0, 0xFFFF))
        else:
            follow = rng.choice((P_DATA_TF, RELEASE_RQ, ABORT, ASSOCIATE_RQ, rng.randint(0, 255)))
            then = pdu(follow, rng.randbytes(rng.randint(0, 64)))
        yield kind, bytes(data), then


def test_mutated_and_random_pdus(node: NodeProcess) -> None:
    rng = random.Random(SEED)
    valid = associate_rq()
    answers: dict[int | None, int] = {}
    cases = _mutations(rng, valid)
    for number in range(CASES):
        kind, data, then = next(cases)
        try:
            first = send_and_hang_up(node, data, then)
        except AssertionError as exc:
            raise AssertionError(f"seed {SEED}, case {number} ({kind}): {exc}") from None
        answers[first] = answers.get(first, 0) + 1
        assert node.proc is not None and node.proc.poll() is None, (
            f"seed {SEED}, case {number} ({kind}) killed the node: {data.hex()}\n{node.log()}"
        )
    # The cases reached the parser: some were accepted, some refused, some aborted.
    assert answers.get(ASSOCIATE_AC, 0) > 0 and answers.get(ABORT, 0) > 0, answers
    assert_healthy(node)


ABSURD = {
    "PDU length 0xFFFFFFFF": struct.pack(">BBI", ASSOCIATE_RQ, 0, 0xFFFFFFFF) + associate_rq()[6:],
    "PDU length 0": struct.pack(">BBI", ASSOCIATE_RQ, 0, 0),
    "PDU length shorter than its items": struct.pack(">BBI", ASSOCIATE_RQ, 0, 80)
    + associate_rq()[6:],
    "item length beyond the PDU": associate_rq()[:76] + b"\xff\xff" + associate_rq()[78:],
    "sub-item length beyond its item": associate_rq().replace(
        item(0x51, struct.pack(">I", 16384)), b"\x51\x00\xff\xf0" + struct.pack(">I", 16384)
    ),
    "maximum PDU length 0xFFFFFFFF": associate_rq().replace(
        item(0x51, struct.pack(">I", 16384)), item(0x51, b"\xff\xff\xff\xff")
    ),
    "AE titles of control bytes": associate_rq()[:10] + bytes(range(1, 33)) + associate_rq()[42:],
    "P-DATA PDV length 0xFFFFFFFF": associate_rq()
    + pdu(P_DATA_TF, struct.pack(">IBB", 0xFFFFFFFF, CT_CONTEXT, 0x03) + b"\0" * 16),
    "P-DATA PDV length 0": associate_rq()
    + pdu(P_DATA_TF, struct.pack(">IBB", 0, CT_CONTEXT, 0x03)),
    "P-DATA for an unknown context": associate_rq() + p_data(99, 0x03, b"\0" * 32),
    "P-DATA before any association": p_data(CT_CONTEXT, 0x03, c_store_rq(small_slice())),
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_lengths_and_out_of_order_pdus(node: NodeProcess, case: str) -> None:
    send_and_hang_up(node, ABSURD[case])
    assert_healthy(node)


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM), which only grows."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.parametrize("pdu_type", [ASSOCIATE_RQ, P_DATA_TF], ids=["A-ASSOCIATE-RQ", "P-DATA-TF"])
def test_a_peer_streaming_a_huge_pdu_cannot_exhaust_memory(
    node: NodeProcess, pdu_type: int
) -> None:
    """A PDU's length field allows 4 GiB (PS3.8 9.3.1), and pynetdicom would read it all
    into memory: a PDU announced beyond what the node reads is refused after its header, the
    connection closed while the peer still streams, and the node's peak memory barely moves."""
    assert node.proc is not None
    before = peak_rss_bytes(node.proc.pid)
    announced = 1 << 30
    streamed = 0
    sock = associate(node) if pdu_type == P_DATA_TF else connect(node)
    with sock:
        sock.settimeout(10)
        try:
            sock.sendall(struct.pack(">BBI", pdu_type, 0, announced))
            chunk = b"\0" * (1 << 20)
            while streamed < 256 << 20:
                sock.sendall(chunk)
                streamed += len(chunk)
        except TimeoutError:
            raise AssertionError("the node stopped reading but kept the connection") from None
        except OSError:  # reset or broken pipe: the node hung up, as it should
            pass
        else:
            raise AssertionError(f"the node read {streamed >> 20} MiB of one PDU")
    # What got through before the reset sat in the kernel's socket buffers, not in the node.
    assert streamed < 64 << 20, streamed
    assert peak_rss_bytes(node.proc.pid) - before < 32 << 20
    assert "announced a PDU of 1073741824 bytes" in node.log()
    assert_healthy(node)


def _cut(ds: Dataset, where: str) -> bytes:
    """The bytes of a C-STORE of ``ds`` up to a point inside it."""
    pdus = c_store_pdus(ds)
    assert len(pdus) >= 4, "the data set should span several P-DATA-TFs"
    if where == "mid-command-pdu":
        return pdus[0][: len(pdus[0]) // 2]
    if where == "after-command":
        return pdus[0]
    if where == "mid-data-set-pdu":
        return b"".join(pdus[:2]) + pdus[2][: len(pdus[2]) // 2]
    if where == "between-data-set-pdus":
        return b"".join(pdus[:-1])
    return b"".join(pdus[:-1]) + pdus[-1][:-1]  # all but the last byte


@pytest.mark.parametrize(
    "where",
    [
        "mid-command-pdu",
        "after-command",
        "mid-data-set-pdu",
        "between-data-set-pdus",
        "one-byte-short",
    ],
)
def test_disconnect_mid_transfer_stores_nothing(node: NodeProcess, where: str) -> None:
    ds = small_slice()
    noticed = "association from HOSTILE aborted"
    before = node.log().count(noticed)
    sock = associate(node)
    sock.sendall(_cut(ds, where))
    sock.close()  # abruptly: no A-RELEASE, no A-ABORT
    deadline = time.monotonic() + SLACK_S
    while node.log().count(noticed) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.log().count(noticed) > before, "the node did not notice that the peer left"
    assert not indexed(node, ds.SOPInstanceUID)
    assert_index_consistent(node)
    # The same instance, sent whole by the same raw peer, is stored: the cut made the difference.
    assert raw_store(node, ds) == 0
    assert indexed(node, ds.SOPInstanceUID)
    assert_healthy(node)


def _silent(node: NodeProcess) -> socket.socket:
    return connect(node)


def _silent_after_accept(node: NodeProcess) -> socket.socket:
    return associate(node)


def _stalled_mid_request(node: NodeProcess) -> socket.socket:
    sock = connect(node)
    sock.sendall(associate_rq()[:40])
    return sock


def _stalled_mid_data_set(node: NodeProcess) -> socket.socket:
    sock = associate(node)
    sock.sendall(_cut(small_slice(), "mid-data-set-pdu"))
    return sock


def test_idle_and_stalled_peers_are_dropped_and_free_their_slots(make_node) -> None:
    """Peers that connect and never speak, go quiet after the association, or stop in the
    middle of a PDU: the node's ACSE and network timeouts end them all, and the slots they
    held take new associations again."""
    node = make_node(**TIGHT)
    for kinds in (
        (_silent, _silent_after_accept, _stalled_mid_request),
        (_stalled_mid_data_set, _stalled_mid_request, _silent),
    ):
        started = time.monotonic()
        sockets = [open_one(node) for open_one in kinds]
        try:
            # They hold every slot: a well-behaved peer is turned away meanwhile (once the
            # node has taken them in: a connection waits in the kernel's backlog until then).
            time.sleep(0.3)
            turned_away = node.log().count("more than scp.max_associations")
            assert echo_status(node) is None
            assert node.log().count("more than scp.max_associations") == turned_away + 1
            for sock, kind in zip(sockets, kinds, strict=True):
                left = started + NETWORK_TIMEOUT_S + SLACK_S - time.monotonic()
                assert closed_by_node(sock, left), f"{kind.__name__} was never dropped"
        finally:
            for sock in sockets:
                sock.close()
        deadline = time.monotonic() + SLACK_S
        while echo_status(node) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_healthy(node)


def test_associations_beyond_the_limit_are_rejected_and_the_others_finish(make_node) -> None:
    node = make_node(**TIGHT)
    ae = normal_ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    holders = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(3)]
    try:
        assert all(a.is_established for a in holders)
        for _ in range(3):
            with connect(node) as sock:
                sock.sendall(associate_rq())
                reply = read_pdu(sock)
                assert reply is not None and reply[0] == ASSOCIATE_RJ, reply
                # PS3.8 9.3.4: rejected-transient (2), service-provider presentation (3),
                # local-limit-exceeded (2).
                assert tuple(reply[1][1:4]) == (2, 3, 2)
        study = generate_uid()
        sent = [[small_slice(StudyInstanceUID=study) for _ in range(2)] for _ in holders]
        for assoc, datasets in zip(holders, sent, strict=True):
            assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0, 0]
    finally:
        for assoc in holders:
            assoc.release()
    assert all(indexed(node, ds.SOPInstanceUID) for datasets in sent for ds in datasets)
    assert "more than scp.max_associations (3) open" in node.log()
    assert_healthy(node)


MALFORMED = {
    # PS3.8 9.3.8 knows sources 0 and 2 only; pynetdicom's protocol machine stops on 12.
    "A-ABORT from an unknown source": pdu(ABORT, b"\0\0\x0c\0"),
    "a command set that is not one": p_data(CT_CONTEXT, 0x03, bytes(range(40))),
}


def audited_studies(node: NodeProcess) -> list[str]:
    """Studies named by the audit trail's records of received instances (PS3.15 A.5.3.2)."""
    path = node.data_dir / "audit" / "audit.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        message = json.loads(line)
        if message["EventIdentification"]["EventID"]["csd-code"] == "110104":
            found += [
                o["ParticipantObjectID"] for o in message.get("ParticipantObjectIdentification", [])
            ]
    return found


@pytest.mark.parametrize("case", MALFORMED)
def test_an_association_ended_by_a_malformed_pdu_is_accounted_for(
    node: NodeProcess, case: str
) -> None:
    """The instances it carried are audited, and its series no longer waits for it: the next
    association that carries the series and releases completes it."""
    study, series = generate_uid(), generate_uid()
    with associate(node) as sock:
        assert store_on(sock, small_slice(StudyInstanceUID=study, SeriesInstanceUID=series)) == 0
        sock.sendall(MALFORMED[case])
        assert closed_by_node(sock, SLACK_S)
    deadline = time.monotonic() + SLACK_S
    while study not in audited_studies(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert study in audited_studies(node), "the received instance was never audited"
    assert store_status(node, small_slice(StudyInstanceUID=study, SeriesInstanceUID=series)) == 0
    completed = (
        f"SELECT COUNT(*) FROM series WHERE series_uid = '{series}' AND completed_at IS NOT NULL"
    )
    assert node.wait_for(completed, 1, timeout_s=SLACK_S) == 1, "the series still waits"
    assert_healthy(node)
