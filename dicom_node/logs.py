"""Logging for the node's processes: one format, and no patient data above DEBUG.

The node's own messages name attributes, never their values. The libraries it reads DICOM
with do not: pydicom's validation warnings quote the value they refuse ("Invalid value for VR
DA: '1923-04-17'"), highdicom's quote a patient's name it doubts, pynetdicom's checks of a
message's UIDs quote the UID, and pydicom and highdicom also raise theirs as Python warnings,
which would reach stderr unformatted. Their records, and Python warnings, are therefore
logged at DEBUG; what an operator needs from such a problem the node says in its own words
(e.g. which attribute of a source was left empty in the results).
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

# Logger names whose records may quote data values. pynetdicom.utils validates the UIDs and
# AE titles of every DIMSE message and quotes the value it finds non-conformant; the rest of
# pynetdicom's warnings (aborts, timeouts) are an operator's and stay as they are.
QUOTING_LOGGERS = frozenset({"pydicom", "highdicom", "py.warnings", "pynetdicom.utils"})


class _QuotedDataAtDebug(logging.Filter):
    """A handler filter: records of :data:`QUOTING_LOGGERS` (and their children) become DEBUG
    records, shown only when the node logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record.name == n or record.name.startswith(f"{n}.") for n in QUOTING_LOGGERS):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def setup_logging(level: str, *, process: str = "") -> None:
    """Log to stderr at ``level``; ``process`` tells a worker's lines from the node's."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s %(name)s{process}: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; its warnings and errors are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _QuotedDataAtDebug) for f in handler.filters):
            handler.addFilter(_QuotedDataAtDebug())


def raised_where(exc: BaseException) -> str:
    """An exception as it may be logged above DEBUG when its message may quote data (a
    library's): its type and the file and line that raised it, never its message."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}"


__all__ = ["QUOTING_LOGGERS", "raised_where", "setup_logging"]
