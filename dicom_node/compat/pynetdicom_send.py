"""pynetdicom's switch for streaming a Part-10 file's data set from disk in C-STORE.

What upstream does (pynetdicom 3.0): ``Association.send_c_store(path)`` decodes the file with
pydicom and re-encodes it, unless the module-level setting
``pynetdicom._config.STORE_SEND_CHUNKED_DATASET`` is on; then it sends the encoded data set
from the file in chunks of the peer's maximum PDU size, exactly as stored (it needs an accepted
presentation context of the file's own transfer syntax). The setting came with
https://github.com/pydicom/pynetdicom/pull/520 for
https://github.com/pydicom/pynetdicom/issues/517 ("limit memory usage when handling messages
with datasets"); it is process-wide, with no per-association or per-call option, and lives in
the private ``_config`` module, which pynetdicom documents as where its settings are.

Upstream issue for a per-call option: none found.

Remove when ``send_c_store`` takes the choice as an argument (then :mod:`dicom_node.scu`
passes it) or when the node's only C-STORE sender needs no switch. Only :mod:`dicom_node.scu`
uses this module.
"""

from __future__ import annotations

from pynetdicom import _config


def stream_files_from_disk() -> None:
    """Make ``send_c_store(path)`` stream the file's data set as stored, in this whole process,
    instead of decoding and re-encoding it."""
    _config.STORE_SEND_CHUNKED_DATASET = True
