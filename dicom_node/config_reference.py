"""The configuration reference (``docs/configuration.md``), generated from the model itself.

Beside :mod:`dicom_node.conformance`, which generates the conformance statement's tables: both
documents are rendered from the code they describe, so that they cannot drift from what the node
accepts, and a test fails when a document and its generator disagree.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from dicom_node.config import NodeConfig


def _type_name(annotation: Any) -> str:
    """A type as a person reads it in the reference: ``list of str``, ``one of a, b``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} built-in entries (see `dicom-node config show`)"
    if isinstance(value, Path):
        value = str(value)
    return (
        "`"
        + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        + "`"
    )


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The section models an annotation holds (a section, or a mapping/union of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _models_in(args[0])
    if origin in (Union, UnionType):
        return [m for a in args for m in _models_in(a)]
    return []


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None``; any other annotation as it is."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _reference_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    """One row per key of ``model`` under ``prefix``, sections expanded. A section model that
    two keys of ``model`` share (a rule's ``roles`` take what its ``series`` takes) is expanded
    under the first; the second points at it instead of repeating every key."""
    seen: dict[type[BaseModel], str] = {}
    rows = []

    def expand(section: type[BaseModel], under: str) -> list[tuple[str, str, str, str]]:
        if section in seen:
            return [(f"{under}*", "", "", f"the keys of `{seen[section]}*`")]
        seen[section] = under
        return _reference_rows(section, under)

    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        nested = _models_in(annotation)
        bare = _without_none(annotation)
        if get_origin(bare) is list and (items := _models_in(get_args(bare)[0])):
            # A list of sections (routing.rules): each item's keys, under `key[].`
            description = field.description or ""
            rows.append((key, _type_name(annotation), _default_text(field), description))
            for section in items:
                rows += expand(section, f"{key}[].")
            continue
        if nested and get_origin(annotation) is not list:
            rows.append((key, "section", "", (field.description or nested[0].__doc__ or "")))
            for section in nested:
                rows += expand(section, f"{key}.")
            continue
        if get_origin(bare) is dict and _models_in(get_args(bare)[1]):
            rows.append(
                (
                    f"{key}.<name>",
                    _type_name(get_args(bare)[1]),
                    "none",
                    field.description or "",
                )
            )
            for section in _models_in(get_args(bare)[1]):
                rows += expand(section, f"{key}.<name>.")
            continue
        rows.append((key, _type_name(annotation), _default_text(field), field.description or ""))
    return rows


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in rows:
        meaning = " ".join(meaning.split()).replace("|", "\\|")
        kind = kind.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {default} | {meaning} |")
    return lines


def builtin_settings() -> dict[str, type[BaseModel]]:
    """The Settings model of each algorithm this distribution ships, by entry-point name.

    Only dicom-node's own entry points: a third-party plugin installed beside it documents its
    settings itself, and the reference must not change with what else is installed.
    """
    from importlib.metadata import distribution

    from dicom_node.plugins import ENTRY_POINT_GROUP, register

    found: dict[str, type[BaseModel]] = {}
    for ep in distribution("dicom-node").entry_points.select(group=ENTRY_POINT_GROUP):
        cls = register(ep).algorithm
        if cls is not None and cls.settings_model is not None:
            found[ep.name] = cls.settings_model
    return dict(sorted(found.items()))


def configuration_reference() -> str:
    """Every configuration key with its type, default and meaning, as Markdown, generated from
    the models themselves (the node's, and the built-in algorithms' Settings) so that the
    documentation cannot drift from what the node accepts."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `dicom_node/config.py` by `dicom-node config reference`; a test fails",
        "when this file and the model differ. Keys are YAML paths; environment variables",
        "override them as `DICOM_NODE__<SECTION>__<KEY>`.",
        "",
        *_table(_reference_rows(NodeConfig, "")),
        "",
        "## Settings of the built-in algorithms",
        "",
        "Each algorithm's section `algorithms.<name>` is checked against its Settings model by",
        "`dicom-node config check`, `dicom-node algorithms` and the worker: an unknown or null",
        "key is refused, naming it, so that a misspelt `bundle` cannot quietly run the demo",
        "weights. Generated from the models in `algorithms/` (a plugin of another package",
        "documents its own).",
    ]
    for name, model in builtin_settings().items():
        # A null is refused (leave the key out), so a key without a default is "not set".
        rows = [
            (
                key,
                kind.removesuffix(" or null"),
                "not set" if default == "`null`" else default,
                text,
            )
            for key, kind, default, text in _reference_rows(model, f"algorithms.{name}.")
        ]
        lines += ["", f"### {name}", "", *_table(rows)]
    return "\n".join(lines) + "\n"
