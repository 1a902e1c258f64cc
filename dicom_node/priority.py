"""The two priorities of the node's queue: the class a routing rule gives a job, and the
Priority a sender asks for in its C-STORE request.

A rule sets ``priority: stat | urgent | routine``; its inference jobs are claimed by class
(stat first), then by age. A job that waited ``worker.priority_aging_s`` counts one class
higher, and one more for each further period, so a routine job under a stream of stat jobs
counts as stat after two periods and then goes first as the oldest: none waits for ever.

The request's Priority (PS3.7 9.1.1.1, C-STORE-RQ (0000,0700)) is a fact about how a series
came, recorded with each instance, which rules may match on; it does not reorder the queue by
itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

Priority = Literal["stat", "urgent", "routine"]
# The classes best first: a class's index is its rank, which the claim orders by.
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
DEFAULT_PRIORITY: Priority = "routine"
# How long a queued job waits before it counts one class higher (worker.priority_aging_s):
# ten minutes keeps stat ahead for a department's morning peak, and bounds a routine job's
# wait behind stat work to about two periods once it is the oldest.
PRIORITY_AGING_S = 600.0

RequestPriority = Literal["HIGH", "MEDIUM", "LOW"]
# PS3.7 9.1.1.1 Priority (0000,0700): LOW = 0002H, MEDIUM = 0000H, HIGH = 0001H.
REQUEST_PRIORITY_CODES: dict[int, RequestPriority] = {
    0x0001: "HIGH",
    0x0000: "MEDIUM",
    0x0002: "LOW",
}
# Best first, as PRIORITIES.
REQUEST_PRIORITIES: tuple[RequestPriority, ...] = get_args(RequestPriority)


def rank(priority: str) -> int:
    """A job class's rank, 0 the first claimed; ValueError for a word that is none."""
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        raise ValueError(
            f"a job's priority is one of {', '.join(PRIORITIES)}, not {priority!r}"
        ) from None


def request_priority(code: int | None) -> RequestPriority:
    """The word for a C-STORE request's Priority code (PS3.7 9.1.1.1); a request without one
    is MEDIUM, the code 0000H a sender leaves as it is. ValueError for any other code."""
    if code is None:
        return "MEDIUM"
    try:
        return REQUEST_PRIORITY_CODES[int(code)]
    except KeyError:
        raise ValueError(f"Priority 0x{int(code):04X} is not LOW, MEDIUM or HIGH") from None


def highest_request_priority(values: Iterable[str | None]) -> RequestPriority | None:
    """The highest of the Priorities a series' instances were sent with; None when none was
    recorded (instances stored before the node recorded it)."""
    found = set(values)
    return next((p for p in REQUEST_PRIORITIES if p in found), None)


__all__ = [
    "DEFAULT_PRIORITY",
    "PRIORITIES",
    "PRIORITY_AGING_S",
    "REQUEST_PRIORITIES",
    "REQUEST_PRIORITY_CODES",
    "Priority",
    "RequestPriority",
    "highest_request_priority",
    "rank",
    "request_priority",
]
