"""Finding and driving the real DICOM peers (dcmtk) that tests and benchmarks talk to."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def dcmtk_tool(name: str) -> str | None:
    """The path of a dcmtk/dicom3tools program, or None.

    Debian's binaries come first: Python packages install scripts named like dcmtk's tools
    (pynetdicom's own ``storescu``) that shadow them on PATH.
    """
    debian = Path("/usr/bin") / name
    return str(debian) if debian.exists() else shutil.which(name)


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY dcmtk's Nagle/delayed-ACK interplay adds ~40 ms per message.
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
