"""JSON schemas for the constrained-decoding tests: every output that finishes with "stop" must
validate against its schema. A random model only makes structure through the grammar, so
strings, arrays and numbers are bounded where they could otherwise run on forever."""
from __future__ import annotations

NAME = {"type": "string", "maxLength": 12}
SHORT = {"type": "string", "maxLength": 6}

SCHEMAS: dict[str, dict] = {
    "flat_object": {
        "type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"]},
    "all_scalar_types": {
        "type": "object",
        "properties": {"s": SHORT, "i": {"type": "integer", "minimum": -10, "maximum": 10},
                       "n": {"type": "number", "minimum": 0, "maximum": 1}, "b": {"type": "boolean"},
                       "z": {"type": "null"}},
        "required": ["s", "i", "n", "b", "z"]},
    "required_subset": {
        "type": "object",
        "properties": {"a": SHORT, "b": {"type": "integer", "minimum": 0, "maximum": 9}, "c": {"type": "boolean"},
                       "d": SHORT},
        "required": ["b", "d"]},
    "no_required": {
        "type": "object", "properties": {"x": {"type": "boolean"}, "y": {"type": "integer", "minimum": 0, "maximum": 3}}},
    "additional_properties_false": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "tag": SHORT},
        "required": ["id"], "additionalProperties": False},
    "nested_objects": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {
            "name": NAME, "address": {"type": "object", "properties": {"city": NAME, "zip": {
                "type": "string", "pattern": "[0-9]{5}"}}, "required": ["city", "zip"]}},
            "required": ["name", "address"]}},
        "required": ["user"]},
    "deeply_nested": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
            "c": {"type": "object", "properties": {"d": {"type": "integer", "minimum": 0, "maximum": 5}},
                  "required": ["d"]}}, "required": ["c"]}}, "required": ["b"]}},
        "required": ["a"]},
    "array_of_strings_bounded": {
        "type": "array", "items": SHORT, "minItems": 1, "maxItems": 4},
    "array_exact_length": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 3, "maxItems": 3},
    "array_of_objects": {
        "type": "array", "maxItems": 3,
        "items": {"type": "object", "properties": {"k": SHORT, "v": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["k", "v"]}},
    "object_with_arrays": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": SHORT, "maxItems": 3},
                       "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 10},
                                  "minItems": 1, "maxItems": 3}},
        "required": ["tags", "scores"]},
    "nested_arrays": {
        "type": "array", "maxItems": 3,
        "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}},
    "string_enum": {"type": "string", "enum": ["red", "green", "blue"]},
    "mixed_enum": {"enum": [1, "two", None, True, 3.5]},
    "enum_in_object": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}, "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
        "required": ["color", "size"]},
    "const_value": {
        "type": "object", "properties": {"version": {"const": 2}, "kind": {"const": "report"}},
        "required": ["version", "kind"]},
    "integer_range": {"type": "integer", "minimum": 18, "maximum": 65},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
    "number_range": {"type": "number", "minimum": -1.5, "maximum": 2.25},
    "integer_multiple_of": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "string_pattern": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"]},
    "string_min_max_length": {"type": "string", "minLength": 2, "maxLength": 5},
    "format_date": {
        "type": "object", "properties": {"born": {"type": "string", "format": "date"}}, "required": ["born"]},
    "format_email": {"type": "string", "format": "email"},                 # unbounded: may hit the length limit
    "format_ipv4_uuid": {
        "type": "object",
        "properties": {"ip": {"type": "string", "format": "ipv4"}, "id": {"type": "string", "format": "uuid"}},
        "required": ["ip", "id"]},
    "format_date_time": {"type": "string", "format": "date-time"},
    "any_of_types": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, SHORT, {"type": "null"}]},
    "any_of_objects": {
        "anyOf": [
            {"type": "object", "properties": {"cat": SHORT}, "required": ["cat"], "additionalProperties": False},
            {"type": "object", "properties": {"dog": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["dog"], "additionalProperties": False}]},
    "nullable_type_list": {
        "type": "object", "properties": {"maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
        "required": ["maybe"]},
    "refs_and_defs": {
        "$defs": {"point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["x", "y"]}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"]},
    "refs_definitions": {
        "definitions": {"name": NAME},
        "type": "array", "items": {"$ref": "#/definitions/name"}, "maxItems": 3},
    "recursive_ref": {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer", "minimum": 0, "maximum": 9},
            "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["v", "next"]}},
        "$ref": "#/$defs/node"},
    "pattern_properties": {
        "type": "object", "patternProperties": {"^x[0-9]$": {"type": "integer", "minimum": 0, "maximum": 9}},
        "additionalProperties": False, "maxProperties": 3},
    "min_max_properties": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}},
        "minProperties": 2, "maxProperties": 2},
    "prefix_items_tuple": {
        "type": "array", "prefixItems": [SHORT, {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}],
        "items": False},
    "one_of_disjoint": {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["yes", "no"]}]},
    "realistic_event": {
        "type": "object",
        "properties": {
            "title": NAME, "date": {"type": "string", "format": "date"},
            "priority": {"enum": ["low", "medium", "high"]},
            "attendees": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
                "name": SHORT, "email": {"type": "string", "format": "email"}}, "required": ["name"]}},
            "duration_min": {"type": "integer", "minimum": 5, "maximum": 480}},
        "required": ["title", "date", "priority"], "additionalProperties": False},
    "empty_object_schema": {"type": "object", "properties": {}, "additionalProperties": False},
    "boolean_root": {"type": "boolean"},
}
