"""The tool definitions as the model reads them: input schemas without what only a validator needs.

Every conversation with this server installed pays for the definitions (name, description, input schema), so
the published schema keeps what tells the model how to call: types, required names, descriptions, meaningful
defaults and small bounds. Pydantic's generated extras go: titles, `anyOf [X, null]` for optional arguments
(an argument left out is the way to say "none"), null/false/empty defaults, string and list length limits and
bounds that only guard against nonsense (lower bounds, huge upper bounds). The server still validates every
argument against the full model and answers a refusal with one sentence per field.

Output schemas are not published: see README ("Tool definitions and output schemas"). The server still checks
every structured result against its model before it is sent.
"""

from __future__ import annotations

import json
from typing import Any

from mcp.types import Tool

DEFENSIVE_MAX = 1000  # an upper bound at or above this guards against nonsense; below it, it informs the call
_DROPPED = frozenset({"title", "minLength", "maxLength", "maxItems", "minItems", "minimum", "exclusiveMinimum"})
_EMPTY_DEFAULTS: tuple[Any, ...] = (None, False, "", [], {})


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (pydantic's JSON schema of a tool's arguments) as published: references inlined, extras dropped."""
    defs: dict[str, Any] = schema.get("$defs", {})
    return _node(schema, defs)


def _node(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        merged = {**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in schema.items() if k != "$ref"}}
        return _node(merged, defs)
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1 and len(kept) < len(branches):
            outer = {k: v for k, v in schema.items() if k != "anyOf"}
            merged = {**kept[0], **outer}
            if outer.get("default") is not None and isinstance(merged.get("type"), str):
                merged["type"] = [merged["type"], "null"]  # null means something other than the default here
            return _node(merged, defs)  # else: optional X, published as X and left out for "none"
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED or key == "$defs":
            continue
        if key == "default" and any(value == empty and type(value) is type(empty) for empty in _EMPTY_DEFAULTS):
            continue
        if key in ("maximum", "exclusiveMaximum") and isinstance(value, int | float) and value >= DEFENSIVE_MAX:
            continue
        if key == "additionalProperties" and schema.get("type") == "object":
            continue  # a name → value map; the description says what the values are
        if key == "properties":
            out[key] = {name: _node(sub, defs) for name, sub in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = _node(value, defs)
        elif key == "anyOf":
            out[key] = [_node(b, defs) for b in value]
        else:
            out[key] = value
    return out


def published(tool: Tool) -> Tool:
    """`tool` as `tools/list` carries it: the compact input schema, no output schema."""
    return tool.model_copy(update={"input_schema": compact(tool.input_schema), "output_schema": None})


def definition_size(tool: Tool) -> int:
    """Characters of what reaches the model: name, description and the input schema as compact JSON."""
    schema = json.dumps(tool.input_schema, ensure_ascii=False, separators=(",", ":"))
    return len(tool.name) + len(tool.description or "") + len(schema)
