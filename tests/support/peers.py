"""The external programs the tests run, and how dcmtk is told to send what the corpus holds."""

from __future__ import annotations

import os

import pytest

from dicom_node.testing import dcmtk_tool


def require_tool(name: str) -> str:
    """The path of a peer program; in CI a missing one is a failure, elsewhere a skip."""
    path = dcmtk_tool(name)
    if path is None:
        message = f"{name} is not installed (apt-get install dcmtk dicom3tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


# storescu proposes only uncompressed syntaxes unless told which codec to propose.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": ["-xi"],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
    "1.2.840.10008.1.2.5": ["-xr"],
}
