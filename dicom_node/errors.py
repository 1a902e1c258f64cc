"""Every exception the node raises on purpose, in one tree (as httpx keeps its own).

A caller catches :class:`DicomNodeError` for anything the node refused or could not do, or one
branch of it. The tree also says whether trying again can help, so that every place that retries
(the worker, the deliverer) decides it the same way:

- :class:`Permanent`: trying again with the same input, weights, configuration and
  destination fails the same way, so the work fails at once, its reason logged at ERROR (the
  messages are written without patient data). Its branches say whose fault it is:
  :class:`InputFault` (the input: a series an algorithm cannot use, a result that cannot be
  written from it), :class:`SetupFault` (the node's installation or configuration: weights
  that do not fit their network, an invalid setting) and :class:`DestinationRefused` (a
  destination that refuses for good).
- :class:`Transient`: the node's or a peer's passing trouble (a worker that died, a busy
  destination): tried again, up to the configured attempts.
- Anything else, the node's own exceptions outside both branches and any library's, is taken
  as the node's and tried again: an unknown failure may be passing.

Each class also keeps the built-in base it always had (``ValueError`` for bad values,
``ConnectionError`` for a peer that will not talk), so ``except ValueError`` around a call
behaves as before. Messages name the attribute, key or file at fault and never quote
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
    "DestinationRefused",
    "DestinationUnavailable",
    "DicomNodeError",
    "InputError",
    "InputFault",
    "InvalidInstance",
    "IrregularDataSet",
    "ObjectCorrupt",
    "ObjectMissing",
    "ObjectStoreError",
    "ObjectStoreRefused",
    "ObjectStoreUnavailable",
    "OutOfResources",
    "PeerGone",
    "Permanent",
    "ProtocolError",
    "QaUnusable",
    "RejectedInstance",
    "RetrievalFailed",
    "SendAbandoned",
    "SetupFault",
    "SopMismatch",
    "SourceRefused",
    "SourceUnavailable",
    "StowRequestError",
    "TooSmallForText",
    "Transient",
    "UnsendableFile",
    "WeightsMismatch",
    "WriteError",
]


class DicomNodeError(Exception):
    """The root of every exception the node raises on purpose."""


# --- whether trying again can help ----------------------------------------------------------


class Permanent(DicomNodeError):
    """Trying again cannot help: the same input, weights, configuration or destination fails
    the same way. The work fails at once; the message, written without patient data, is
    logged at ERROR."""


class InputFault(Permanent):
    """The input's fault: a series an algorithm cannot use, or a result that cannot be
    written from it. The job fails at once (its first attempt)."""


class SetupFault(Permanent):
    """The node's installation or configuration is at fault (weights that do not fit, an
    invalid setting): every job that needs it fails the same way until a person changes it,
    so none is tried again."""


class Transient(DicomNodeError):
    """The node's or a peer's passing trouble (a worker that died, a destination busy for
    now): the work is tried again, up to its configured attempts."""


# --- configuration and documents -------------------------------------------------------------


class ConfigError(SetupFault, ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class ConformanceDocError(DicomNodeError, ValueError):
    """The conformance statement's generated regions are missing, unknown or malformed."""


# --- receive and store -----------------------------------------------------------------------


class RejectedInstance(DicomNodeError):
    """The data set cannot be stored; the message says why without quoting patient data."""


class InvalidInstance(RejectedInstance):
    """Missing or invalid identifying attributes, or an unreadable data set."""


class IrregularDataSet(DicomNodeError, ValueError):
    """A data set the header scan (:mod:`dicom_node.header_scan`) does not handle: pydicom
    parses it instead, and decides whether it is refused. Never leaves the store."""


class SopMismatch(RejectedInstance):
    """The data set's SOP Class/Instance UID differ from the C-STORE request's (PS3.4 B.2.3)."""


class OutOfResources(RejectedInstance, Transient):
    """Free disk space is below the configured watermark."""


# --- infer and write -------------------------------------------------------------------------


class InputError(InputFault, ValueError):
    """A series an algorithm cannot use as it is; the message says why, for the job's error."""


class WeightsMismatch(SetupFault, ValueError):
    """Weights that do not fit the network they are loaded into, or are not what they claim."""


class WriteError(InputFault, ValueError):
    """A result that cannot be written as asked; the message says why."""


class TooSmallForText(InputFault, ValueError):
    """The image cannot hold the burned-in text at any size; the message gives its size."""


# --- deliver ---------------------------------------------------------------------------------


class DeliveryError(DicomNodeError):
    """A delivery attempt failed: a :class:`DestinationUnavailable` is tried again (with
    backoff) up to ``delivery.max_attempts``, a :class:`DestinationRefused` is not."""

    @property
    def permanent(self) -> bool:
        """Whether trying again cannot help (the delivery is a dead letter at once)."""
        return isinstance(self, Permanent)

    @staticmethod
    def of(message: str, *, permanent: bool) -> DeliveryError:
        """The failure as its kind: refused for good, or unavailable for now."""
        return DestinationRefused(message) if permanent else DestinationUnavailable(message)


class DestinationUnavailable(DeliveryError, Transient):
    """The destination did not take the results this time (no answer, an abort, a busy
    server, an object it failed to store): tried again with backoff."""


class DestinationRefused(DeliveryError, Permanent):
    """Permanent at a destination: it refused for good (a permanent association rejection,
    PS3.8 7.1.1.9; a STOW-RS client error) or is not configured. Dead at once, until a person
    fixes the cause and replays it."""


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


# --- cluster mode's object store ------------------------------------------------------------


class ObjectStoreError(DicomNodeError):
    """The object store (S3, or a shared folder) that moves inputs and results between the
    node and its workers did not do what was asked; the message names the store and the key."""


class ObjectStoreUnavailable(ObjectStoreError, Transient):
    """The store did not answer, or failed for now (a refused connection, a timeout, a 5xx):
    the job or delivery is tried again later."""


class ObjectStoreRefused(ObjectStoreError, SetupFault):
    """The store refuses for good: a bucket that does not exist, credentials it does not
    accept, a permission it does not grant. A person fixes the configuration."""


class ObjectMissing(ObjectStoreError, SetupFault):
    """No object under the key: staged inputs or results removed from the store (retention,
    a person) or a worker configured with another bucket or prefix than its node."""


class ObjectCorrupt(ObjectStoreError, Transient):
    """An object whose content is not what its manifest recorded (SHA-256): a download damaged
    on the way is fetched again on the next attempt; one damaged at rest fails every attempt."""


# --- commissioning ---------------------------------------------------------------------------


class QaUnusable(DicomNodeError):
    """The configuration or command line does not let qa test the node; the message says
    what to change."""


# --- the receive fast path ------------------------------------------------------------------


class ProtocolError(DicomNodeError, ValueError):
    """A peer broke PS3.7 or PS3.8 on an association the fast path serves; the association
    is aborted with ``reason`` (an A-ABORT reason of PS3.8 Table 9-26)."""

    def __init__(self, message: str, reason: int = 0x06) -> None:  # invalid-PDU-parameter
        super().__init__(message)
        self.reason = reason


class PeerGone(DicomNodeError, ConnectionError):
    """The peer of an association the fast path serves closed the connection, aborted, or
    was silent past ``scp.network_timeout_s`` (``timed_out``)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


# --- DICOMweb ---------------------------------------------------------------------------------


class StowRequestError(DicomNodeError, ValueError):
    """A STOW-RS request that cannot be read as a whole (PS3.18 10.5.3): ``status`` is the
    HTTP status it is answered with (400 bad syntax, 415 a media type not accepted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- retrieve ---------------------------------------------------------------------------------


class RetrievalFailed(DicomNodeError):
    """A retrieval attempt (C-FIND then C-MOVE or C-GET, or QIDO-RS then WADO-RS) did not
    bring what it asked for: a :class:`SourceUnavailable` is tried again with backoff up to
    ``retrieve.max_attempts``, a :class:`SourceRefused` is not."""


class SourceUnavailable(RetrievalFailed, Transient):
    """The source did not answer, aborted, or failed some sub-operations this time."""


class SourceRefused(RetrievalFailed, Permanent):
    """The source refuses for good (it does not know the move destination, PS3.4 C.4.2.1.4
    status A801; a QIDO-RS/WADO-RS client error): a person fixes its configuration."""
