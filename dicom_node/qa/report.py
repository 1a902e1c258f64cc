"""qa's report: one row per check, printed as a table or as JSON, and the exit status."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = [
    "EXIT_FAILED",
    "EXIT_PASSED",
    "EXIT_UNUSABLE",
    "Check",
    "Outcome",
    "exit_status",
    "print_report",
    "print_unusable",
]

EXIT_PASSED, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2

Outcome = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Check:
    """One row of the report: a check on one study (named by its algorithm) or the node."""

    study: str
    name: str
    outcome: Outcome
    detail: str


def exit_status(checks: Sequence[Check]) -> int:
    """1 when a check failed, else 0."""
    return EXIT_FAILED if any(c.outcome == "FAIL" for c in checks) else EXIT_PASSED


def print_unusable(config_name: str, problems: list[str], snippet: str) -> None:
    """Why the configuration cannot be tested, and the YAML to add, on stderr."""
    lines = [f"dicom-node qa: {config_name} does not let qa test the node:"]
    lines += [f"  - {p}" for p in problems]
    if snippet:
        lines += [
            f"Add this to {config_name} (merging with the sections already there), restart the"
            " node, and run qa again:",
            "",
            snippet,
        ]
    print("\n".join(lines), file=sys.stderr)


def print_report(checks: Sequence[Check], header: str, as_json: bool) -> None:
    """The table (or JSON document) of every check and the verdict, on stdout."""
    failed = sum(c.outcome == "FAIL" for c in checks)
    verdict = "FAIL" if failed else "PASS"
    counts = {o: sum(c.outcome == o for c in checks) for o in ("PASS", "FAIL", "SKIP")}
    if as_json:
        print(
            json.dumps(
                {
                    "verdict": verdict,
                    "node": header,
                    "counts": counts,
                    "checks": [asdict(c) for c in checks],
                },
                indent=2,
            )
        )
        return
    widths = [max(len(getattr(c, f)) for c in checks) for f in ("study", "name")]
    print(f"dicom-node qa: {header}")
    print(f"{'study':<{widths[0]}}  {'check':<{widths[1]}}  result  detail")
    for c in checks:
        print(f"{c.study:<{widths[0]}}  {c.name:<{widths[1]}}  {c.outcome:<6}  {c.detail}")
    print(
        f"verdict: {verdict} ({counts['PASS']} passed, {counts['FAIL']} failed,"
        f" {counts['SKIP']} skipped)"
    )
