"""Reading a node's audit trail (PS3.15 A.5 messages, one JSON object a line, rotated files)."""

from __future__ import annotations

import json
from pathlib import Path


def read_trail(path: Path) -> list[dict]:
    """Every message of a trail, oldest first, across its rotated files."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [json.loads(line) for f in [*files, path] for line in f.read_text().splitlines()]


def event_id(message: dict) -> str:
    return message["EventIdentification"]["EventID"]["originalText"]


def event_type(message: dict) -> str | None:
    types = message["EventIdentification"].get("EventTypeCode")
    return types[0]["originalText"] if types else None


def objects(message: dict) -> dict[str, str]:
    """Participant objects by their ID type: Study Instance UID, Patient Number, URI."""
    return {
        o["ParticipantObjectIDTypeCode"]["originalText"]: o["ParticipantObjectID"]
        for o in message.get("ParticipantObjectIdentification", [])
    }
