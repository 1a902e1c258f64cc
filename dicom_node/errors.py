"""Every exception the node raises on purpose, in one tree (as httpx keeps its own).

A caller catches :class:`DicomNodeError` for anything the node refused or could not do, or one
branch of it. Each class also keeps the built-in base it always had (``ValueError`` for bad
values, ``ConnectionError`` for a peer that will not talk), so ``except ValueError`` around a
call behaves as before. Messages name the attribute, key or file at fault and never quote
patient data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.scu import SendReport

__all__ = [
    "AssociationFailed",
    "AssociationRejected",
    "ConfigError",
    "ConformanceDocError",
    "DeliveryError",
    "DicomNodeError",
    "InputError",
    "InvalidInstance",
    "OutOfResources",
    "QaUnusable",
    "RejectedInstance",
    "SendAbandoned",
    "SopMismatch",
    "TooSmallForText",
    "UnsendableFile",
    "WeightsMismatch",
    "WriteError",
]


class DicomNodeError(Exception):
    """The root of every exception the node raises on purpose."""


# --- configuration and documents -------------------------------------------------------------


class ConfigError(DicomNodeError, ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class ConformanceDocError(DicomNodeError, ValueError):
    """The conformance statement's generated regions are missing, unknown or malformed."""


# --- receive and store -----------------------------------------------------------------------


class RejectedInstance(DicomNodeError):
    """The data set cannot be stored; the message says why without quoting patient data."""


class InvalidInstance(RejectedInstance):
    """Missing or invalid identifying attributes, or an unreadable data set."""


class SopMismatch(RejectedInstance):
    """The data set's SOP Class/Instance UID differ from the C-STORE request's (PS3.4 B.2.3)."""


class OutOfResources(RejectedInstance):
    """Free disk space is below the configured watermark."""


# --- infer and write -------------------------------------------------------------------------


class InputError(DicomNodeError, ValueError):
    """A series an algorithm cannot use as it is; the message says why, for the job's error."""


class WeightsMismatch(DicomNodeError, ValueError):
    """Weights that do not fit the network they are loaded into, or are not what they claim."""


class WriteError(DicomNodeError, ValueError):
    """A result that cannot be written as asked; the message says why."""


class TooSmallForText(DicomNodeError, ValueError):
    """The image cannot hold the burned-in text at any size; the message gives its size."""


# --- deliver ---------------------------------------------------------------------------------


class DeliveryError(DicomNodeError):
    """A delivery attempt failed; ``permanent`` when trying again cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class AssociationFailed(DicomNodeError, ConnectionError):
    """The peer rejected, aborted or never answered the association request."""


class AssociationRejected(AssociationFailed):
    """The peer answered A-ASSOCIATE-RJ (PS3.8 7.1.1.9); ``permanent`` when its result says
    that trying again will not help (e.g. our AE title is not known to it)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class SendAbandoned(AssociationFailed):
    """No association could be made for files still to send; ``report`` says what was done,
    those files included (failed, with the reason)."""

    def __init__(self, message: str, report: SendReport) -> None:
        super().__init__(message)
        self.report = report

    @property
    def permanent(self) -> bool:
        """Whether the failure behind it is a permanent rejection (trying again cannot help)."""
        cause = self.__cause__
        return isinstance(cause, AssociationRejected) and cause.permanent


class UnsendableFile(DicomNodeError, ValueError):
    """A DICOM file that cannot be sent as it is (no SOP UIDs, no transfer syntax)."""


# --- commissioning ---------------------------------------------------------------------------


class QaUnusable(DicomNodeError):
    """The configuration or command line does not let qa test the node; the message says
    what to change."""
