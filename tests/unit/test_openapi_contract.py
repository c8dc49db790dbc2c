"""The OpenAPI document is a contract: the served schema must match the committed one, and it
must say enough for a client to be generated from it (ids, typed errors, descriptions, enums)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tenkibox.api.app import openapi_document
from tenkibox.errors import ERROR_TABLE, ErrorCode, TenkiError
from tenkibox.models import ErrorBody, ProcessEvent

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REGENERATE = "python -m tenkibox.api.app > docs/openapi.json"
ERROR_BODY = "#/components/schemas/ErrorBody"
#: every route declares these (``api.routes.errors``): any call can lack a key, be malformed,
#: be too large or fail inside
ALWAYS = {"401", "413", "422", "500"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_document()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in doc["paths"].items()
            for method, op in ops.items()]


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a ``$ref`` followed, and an optional (``anyOf`` with null) unwrapped."""
    if "anyOf" in schema:
        others = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(others) == 1:
            schema = others[0]
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_served_schema_matches_the_committed_contract() -> None:
    served = json.loads(json.dumps(openapi_document(), sort_keys=True))
    committed = json.loads(COMMITTED.read_text())
    if served != committed:
        changed = sorted(set(served["paths"]) ^ set(committed["paths"]))
        changed += sorted(p for p in set(served["paths"]) & set(committed["paths"])
                          if served["paths"][p] != committed["paths"][p])
        raise AssertionError(f"the API changed (paths: {changed or 'schemas only'}); if that is "
                             f"intended, regenerate the contract: {REGENERATE}")


def _words(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_every_schema_property_is_described(doc: dict[str, Any]) -> None:
    missing, restated = [], []
    for name, schema in doc["components"]["schemas"].items():
        for prop, sub in schema.get("properties", {}).items():
            text = (sub.get("description") or "").strip()
            if not text:
                missing.append(f"{name}.{prop}")
            elif _words(text) == _words(prop):
                restated.append(f"{name}.{prop}")
    assert not missing, f"properties without a description: {missing}"
    assert not restated, f"descriptions that only restate the name: {restated}"


def test_every_query_parameter_is_described(doc: dict[str, Any]) -> None:
    """What a query parameter does (``?repair=``, ``?force=``, ``?timeout_s=``) is not in its
    name: a client reads it from the contract."""
    missing = [f"{method.upper()} {path} ?{p['name']}" for method, path, op in operations(doc)
               for p in op.get("parameters", []) if p["in"] == "query"
               and not (p.get("description") or p.get("schema", {}).get("description"))]
    assert not missing, f"query parameters without a description: {missing}"


def test_every_enum_schema_is_described(doc: dict[str, Any]) -> None:
    enums = {n: s for n, s in doc["components"]["schemas"].items() if "enum" in s}
    assert {"SessionState", "SnapshotState", "SnapshotType", "VolumeState", "BuildState",
            "ErrorCode"} <= set(enums)
    assert not [n for n, s in enums.items() if not s.get("description")]


def test_every_operation_has_an_id_and_typed_errors(doc: dict[str, Any]) -> None:
    ids: set[str] = set()
    for method, path, op in operations(doc):
        assert op.get("operationId"), f"{method} {path} has no operationId"
        assert op["operationId"] not in ids, f"{op['operationId']} is used twice"
        ids.add(op["operationId"])
        errors = {s: r for s, r in op["responses"].items() if s.startswith(("4", "5"))}
        assert ALWAYS <= set(errors), (method, path, sorted(errors))
        for status, resp in errors.items():
            assert resp.get("description"), (method, path, status)
            # every error, 422 included, is the one ErrorBody (not FastAPI's own 422 shape)
            ref = resp["content"]["application/json"]["schema"]["$ref"]
            assert ref == ERROR_BODY, (method, path, status, ref)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_error_codes_are_the_error_table(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    code = schemas["ErrorInfo"]["properties"]["code"]
    assert code["$ref"] == "#/components/schemas/ErrorCode"
    assert schemas["ErrorCode"]["type"] == "string"
    assert schemas["ErrorCode"]["enum"] == list(ERROR_TABLE)


@pytest.mark.parametrize("cls", list(ERROR_TABLE.values()), ids=list(ERROR_TABLE))
def test_error_bodies_are_unchanged_on_the_wire(cls: type[TenkiError]) -> None:
    """Every error the server renders parses as ``ErrorBody`` and dumps back to the very same
    JSON: the enum changes the contract, not a byte of the wire."""
    exc = cls.__new__(cls)
    TenkiError.__init__(exc, "m", field="f", details={"quota": "max_volumes"})
    wire = json.loads(json.dumps(exc.to_body()))
    parsed = ErrorBody.model_validate(wire)
    assert parsed.error.code == cls.code
    assert json.loads(parsed.model_dump_json(exclude_none=True)) == wire
    assert f"{parsed.error.code}" == str(parsed.error.code) == cls.code


def test_error_code_members_are_their_codes() -> None:
    assert [str(c) for c in ErrorCode] == list(ERROR_TABLE)
    assert ErrorCode("NotFound") == "NotFound"


def test_process_event_type_is_an_enum_of_its_kinds(doc: dict[str, Any]) -> None:
    prop = doc["components"]["schemas"]["ProcessEvent"]["properties"]["type"]
    assert prop["enum"] == ["stdout", "stderr", "exit", "error"]
    # a plain str at runtime, as the SDK has always handed it out
    event = ProcessEvent.model_validate({"type": "stdout", "data": ""})
    assert type(event.type) is str


def test_enum_query_parameters_are_enums(doc: dict[str, Any]) -> None:
    """A query parameter that filters on a property of what the operation lists must take
    that property's enum when the property is one (``?state=`` of listSessions is a
    ``SessionState``), so a client cannot send a value no record can have."""
    checked = []
    for method, path, op in operations(doc):
        ok = op["responses"].get("200", {}).get("content", {}).get("application/json")
        if not ok:
            continue
        answer = resolve(doc, ok["schema"])
        item = resolve(doc, answer["items"]) if answer.get("type") == "array" else answer
        for param in op.get("parameters", []):
            if param["in"] != "query" or param["name"] not in item.get("properties", {}):
                continue
            prop = item["properties"][param["name"]]
            if "enum" not in resolve(doc, prop):
                continue
            checked.append(f"{op['operationId']}?{param['name']}")
            got = resolve(doc, param["schema"])
            assert got.get("enum") == resolve(doc, prop)["enum"], (method, path, param)
    assert "listSessions?state" in checked  # the rule is not vacuous
