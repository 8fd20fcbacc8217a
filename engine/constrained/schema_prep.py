"""A JSON schema made ready for the grammar compiler: keywords that xgrammar (0.2) accepts but
does not enforce are refused, and string formats it checks loosely become exact patterns.

Either way an output could otherwise fail validation against its schema, which the API
promises never happens to an output that finishes with "stop". The lists were found by
compiling each keyword and reading the grammar (tests/test_constrained_unit.py pins them).
"""
from __future__ import annotations

import copy
import json
from typing import Any, Iterator

# Formats xgrammar accepts too loosely (day 31 of every month, leap seconds, "010.1.1.1"):
# replaced by patterns that match exactly what RFC 3339 / the IPv4 dotted quad allow. No {m,n}
# counts: xgrammar 0.2.8 mis-handles them inside optional groups of a JSON-string pattern.
_D = "[0-9]"
_YEAR = f"(000[1-9]|00[1-9]{_D}|0[1-9]{_D}{_D}|[1-9]{_D}{_D}{_D})"
_LEAP_YEAR = f"({_D}{_D}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"({_YEAR}-(0[13578]|1[02])-(0[1-9]|[12]{_D}|3[01])|{_YEAR}-(0[469]|11)-(0[1-9]|[12]{_D}|30)"
         f"|{_YEAR}-02-(0[1-9]|1{_D}|2[0-8])|{_LEAP_YEAR}-02-29)")
_FRACTION = f"([.]{_D}({_D}({_D})?)?)?"
_TIME = f"([01]{_D}|2[0-3]):[0-5]{_D}:[0-5]{_D}{_FRACTION}(Z|[+-]([01]{_D}|2[0-3]):[0-5]{_D})"
_OCTET = f"(25[0-5]|2[0-4]{_D}|1{_D}{_D}|[1-9]{_D}|{_D})"
EXACT_FORMATS = {
    "date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$",
    "ipv4": f"^{_OCTET}[.]{_OCTET}[.]{_OCTET}[.]{_OCTET}$",
}

# Ignored wherever they appear (keyword -> why a user should care).
_IGNORED = {
    "contains": "array 'contains'", "minContains": "array 'minContains'",
    "maxContains": "array 'maxContains'", "not": "'not'", "if": "'if'/'then'/'else'",
    "then": "'if'/'then'/'else'", "else": "'if'/'then'/'else'",
    "dependentRequired": "'dependentRequired'", "dependentSchemas": "'dependentSchemas'",
    "dependencies": "'dependencies'", "propertyNames": "'propertyNames'",
}
# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties",
        "unevaluatedItems", "contains", "not", "if", "then", "else", "propertyNames")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _subschemas(schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield key, schema[key]
    for key in _LIST:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield f"{key}[{i}]", sub
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield f"{key}.{name}", sub


def unsupported_feature(schema: Any, path: str = "$") -> str | None:
    """A description of the first keyword the grammar would silently drop, or None."""
    if not isinstance(schema, dict):
        return None
    for key, what in _IGNORED.items():
        if key in schema:
            return f"{what} at {path} is not supported by the grammar backend"
    if schema.get("uniqueItems") is True:
        return f"'uniqueItems' at {path} is not supported by the grammar backend"
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "multipleOf" in schema and "number" in types:
        return f"'multipleOf' on a number at {path} is not supported (it is on an integer)"
    if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
        return (f"minLength/maxLength together with pattern/format at {path} are not supported; "
                "put the length into the pattern instead")
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"'allOf' with several schemas at {path} is not supported; merge them into one"
    for sub_path, sub in _subschemas(schema):
        found = unsupported_feature(sub, f"{path}.{sub_path}")
        if found:
            return found
    return None


def _exact_formats(schema: Any) -> Any:
    """schema with each loosely checked string format replaced by its exact pattern (in place)."""
    if not isinstance(schema, dict):
        return schema
    fmt = schema.get("format")
    if fmt in EXACT_FORMATS and "pattern" not in schema and schema.get("type", "string") == "string":
        del schema["format"]
        schema["pattern"] = EXACT_FORMATS[fmt]
    for _, sub in _subschemas(schema):
        _exact_formats(sub)
    return schema


def prepare_schema_text(text: str) -> str:
    """The schema to compile. Raises ValueError for text that is not a JSON schema or that
    uses a keyword the grammar would not enforce."""
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    found = unsupported_feature(schema)
    if found:
        raise ValueError(f"json_schema: {found}")
    if not isinstance(schema, dict) or not any(f'"{f}"' in text for f in EXACT_FORMATS):
        return text
    return json.dumps(_exact_formats(copy.deepcopy(schema)))
