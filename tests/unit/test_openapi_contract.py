"""The OpenAPI document is a contract: the served schema must match the committed one."""

from __future__ import annotations

import json
from pathlib import Path

from tenkibox.api.app import openapi_document

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REGENERATE = "python -m tenkibox.api.app > docs/openapi.json"


def test_served_schema_matches_the_committed_contract() -> None:
    served = json.loads(json.dumps(openapi_document(), sort_keys=True))
    committed = json.loads(COMMITTED.read_text())
    if served != committed:
        changed = sorted(set(served["paths"]) ^ set(committed["paths"]))
        changed += sorted(p for p in set(served["paths"]) & set(committed["paths"])
                          if served["paths"][p] != committed["paths"][p])
        raise AssertionError(f"the API changed (paths: {changed or 'schemas only'}); if that is "
                             f"intended, regenerate the contract: {REGENERATE}")


def test_every_operation_has_an_id_and_typed_errors() -> None:
    doc = openapi_document()
    ids = set()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("operationId"), f"{method} {path} has no operationId"
            assert op["operationId"] not in ids
            ids.add(op["operationId"])
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")) and status != "422":
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody"), (method, path, status)


def test_enum_query_parameters_are_enums() -> None:
    params = openapi_document()["paths"]["/v1/sessions"]["get"]["parameters"]
    state = next(p for p in params if p["name"] == "state")
    assert "SessionState" in json.dumps(state["schema"])
