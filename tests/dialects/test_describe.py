"""Every shipped dialect describes what it serves, all of it, with the
answers its contract names (dialects/describe.py)."""

from __future__ import annotations

import pytest

from dialects.base import Dialect
from dialects.describe import Auth, Description, Operation, json_answer
from gateway.registry import discover

SHIPPED = [cls for cls in discover() if cls.__module__.startswith("dialects.")]
# Statuses every ingestion operation lists (DIALECTS.md); collect never says 401, 413 or 429.
STATUSES = {"cohorly": {200, 400, 401, 413, 429, 503}, "client": {204, 400, 401, 413, 422, 429, 503},
            "inslytic": {202, 400, 401, 413, 429, 503}, "mixpanel": {200, 400, 401, 413, 429, 503},
            "collect": {200, 400, 503}}


def _described(cls: type[Dialect]) -> tuple[Dialect, Description]:
    dialect = cls(cls.Config(), {})
    description = dialect.describe()
    assert description is not None, cls.name
    return dialect, description


def test_the_shipped_dialects_are_all_described() -> None:
    assert {cls.name for cls in SHIPPED} == set(STATUSES)


@pytest.mark.parametrize("cls", SHIPPED, ids=lambda c: c.name)
def test_every_endpoint_and_method_is_described_and_nothing_else(cls: type[Dialect]) -> None:
    dialect, description = _described(cls)
    served = {(e.name, m) for e in dialect.endpoints() for m in e.methods}
    described = [(o.endpoint, o.method) for o in description.operations]
    assert sorted(described) == sorted(served)


@pytest.mark.parametrize("cls", SHIPPED, ids=lambda c: c.name)
def test_operations_name_declared_credentials_and_the_contract_statuses(cls: type[Dialect]) -> None:
    _, description = _described(cls)
    names = {a.name for a in description.auth}
    for operation in description.operations:
        assert set(operation.auth) <= names
        statuses = {a.status for a in operation.answers}
        if cls.name == "collect" and operation.method == "GET":
            assert statuses == {200, 503}  # the pixel: never an error of the caller's
        elif operation.bodies or operation.params:  # not a health check
            assert STATUSES[cls.name] <= statuses, operation
        for answer in operation.answers:
            assert answer.retry_after == (answer.status in (429, 503)), (operation, answer.status)


def test_a_dialect_without_a_description_has_none() -> None:
    class Bare(Dialect):
        name = "bare"

    assert Bare({}, {}).describe() is None


def test_json_answer_is_one_json_body() -> None:
    answer = json_answer(429, "slow down", dict, retry_after=True)
    assert answer.bodies == (("application/json", dict),) and answer.retry_after
    assert Operation(endpoint="e", method="GET", summary="s", answers=(answer,)).body_required
    assert Auth(name="a", kind="body", description="d").credential == ""
