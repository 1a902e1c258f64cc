"""Every presentation context the node accepts is storable (issue 14, item 1).

The node accepts vendor-private and retired storage SOP classes at negotiation; a C-STORE in
such a context must reach the store like any other. Before, pynetdicom had no Storage service
class for the private UIDs and aborted the association at their first C-STORE, so nothing
after it was stored. dcmtk's storescu never proposes these classes: these tests propose every
class of the conformance tables with pynetdicom.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicom_node.phantoms import CtPhantomSpec, ct_series
from dicom_node.scp import PRIVATE_STORAGE_CLASSES, storage_sop_classes
from dicom_node.scu import MAX_CONTEXTS_PER_ASSOCIATION
from tests.support.node import NodeProcess

pytestmark = pytest.mark.integration

SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
SUCCESS = 0x0000


def small_object(sop_class: str, study_uid: str) -> Dataset:
    """The least the node stores: the identifying attributes of PS3.3 C.12.1 and C.7.3.1,
    no pixel data (private and non-image classes have none)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "PRIVATE-STORAGE"
    ds.SeriesNumber = 1
    return ds


def _store(assoc, ds: Dataset) -> int | None:
    """The C-STORE response's status; None when there was none (the association ended)."""
    if not assoc.is_established:
        return None
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    response = assoc.send_c_store(ds)
    return int(response.Status) if "Status" in response else None


def _ae() -> AE:
    ae = AE(ae_title="ALLCLASSES")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def test_every_accepted_storage_class_is_stored(node: NodeProcess) -> None:
    """One object of every storage SOP class of the conformance tables, each in its own
    context (at most 128 per association, PS3.8 9.3.2.2): all accepted, acknowledged with
    Success, stored, and every association released normally."""
    classes = storage_sop_classes()
    assert set(PRIVATE_STORAGE_CLASSES) <= set(classes)
    study_uid = generate_uid()
    statuses: dict[str, int | None] = {}
    sent: list[str] = []
    for start in range(0, len(classes), MAX_CONTEXTS_PER_ASSOCIATION):
        batch = classes[start : start + MAX_CONTEXTS_PER_ASSOCIATION]
        ae = _ae()
        ae.requested_contexts = [build_context(uid, [ExplicitVRLittleEndian]) for uid in batch]
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established, node.log()[-3000:]
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == set(batch), sorted(set(batch) - accepted)
        for uid in batch:
            ds = small_object(uid, study_uid)
            statuses[uid] = _store(assoc, ds)
            sent.append(ds.SOPInstanceUID)
        assoc.release()
        assert assoc.is_released or None in statuses.values(), "not released normally"
    failed = {uid: status for uid, status in statuses.items() if status != SUCCESS}
    assert not failed, failed
    marks = ",".join("?" * len(sent))
    stored = node.query(
        f"SELECT COUNT(*) FROM instances WHERE sop_instance_uid IN ({marks})", tuple(sent)
    )[0][0]
    assert stored == len(classes)


def test_private_object_then_images_on_one_association(node: NodeProcess) -> None:
    """As a PACS forwards a Siemens study: its CSA Non-Image object first, then the CT images,
    all on one association: every one acknowledged and stored, the association released."""
    images = list(ct_series(CtPhantomSpec(slices=5, rows=32, columns=32)))
    private = small_object(SIEMENS_CSA_NON_IMAGE, images[0].StudyInstanceUID)
    ae = _ae()
    ae.add_requested_context(SIEMENS_CSA_NON_IMAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    statuses = [_store(assoc, ds) for ds in [private, *images]]
    assoc.release()
    assert statuses == [SUCCESS] * 6, statuses
    assert assoc.is_released, node.log()[-3000:]
    uids = [private.SOPInstanceUID, *(ds.SOPInstanceUID for ds in images)]
    rows = node.query(
        f"SELECT sop_instance_uid FROM instances WHERE sop_instance_uid IN"
        f" ({','.join('?' * len(uids))})",
        tuple(uids),
    )
    assert {r[0] for r in rows} == set(uids)
    assert "aborted" not in node.log()


RETIRED_ULTRASOUND = (
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
)


def test_retired_ultrasound_is_stored(node: NodeProcess) -> None:
    """Old archives still send ultrasound under the classes retired in 1996 (PS3.4 Annex B
    before the 1996 revision): accepted, acknowledged and stored."""
    ae = _ae()
    for uid in RETIRED_ULTRASOUND:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    objects = [small_object(uid, generate_uid()) for uid in RETIRED_ULTRASOUND]
    statuses = [_store(assoc, ds) if ds.SOPClassUID in accepted else None for ds in objects]
    assoc.release()
    assert accepted == set(RETIRED_ULTRASOUND)
    assert statuses == [SUCCESS, SUCCESS]
    assert set(RETIRED_ULTRASOUND) <= set(storage_sop_classes())
