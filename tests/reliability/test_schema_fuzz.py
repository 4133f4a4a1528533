"""Schema-driven fuzz (schemathesis) of the served OpenAPI spec against a live server on 127.0.0.1.

Every operation in /openapi.json gets generated cases, valid and invalid (positive and negative
modes: wrong types, missing fields, out-of-schema values). Checks: never a 5xx; every 4xx body is
the error object with a message that says what to fix; status codes, content types and bodies
conform to the declared spec; schema-violating input is rejected. (Schema-valid input may still be
a 422 when it breaks a rule the schema cannot say, e.g. chat turns out of order: that is the
contract, so schemathesis' positive_data_acceptance check is the one left out.)
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import given
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from rm_service.settings import ServiceSettings
from rm_service.testing import ServerThread
from tests.reliability.helpers import assert_error_body, fuzz_settings, record

CASES: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    st = ServiceSettings(port=0, scorer="contrastive", model=str(tiny_model_dir), max_items=8, max_prompt_tokens=64,
                         max_response_tokens=64, max_body_bytes=64 * 1024, num_threads=1)
    with ServerThread(st) as srv:
        yield srv
    record("schema fuzz (schemathesis, live server)", cases_tried=sum(CASES.values()), operations=len(CASES),
           **{k.replace(" ", "_"): v for k, v in sorted(CASES.items())})


def _operations():
    """The spec's operations, read from the app without serving it (collection needs no server)."""
    from rm_service.app import create_app

    spec = create_app(ServiceSettings(scorer="rule")).openapi()
    return spec, [r.ok() for r in schemathesis.openapi.from_dict(spec).get_all_operations()]


SPEC, OPERATIONS = _operations()


@pytest.fixture(scope="module")
def served_spec(fuzz_server):
    served = httpx.get(fuzz_server.url + "/openapi.json", timeout=30).json()
    assert served == SPEC, "the served spec differs from the app's: fuzz the one clients see"
    return served


@schemathesis.check
def error_body_says_what_to_fix(ctx, response, case):
    if response.status_code >= 400:
        assert_error_body(httpx.Response(response.status_code, content=response.content), (case.method, case.path))


def _has_inputs(op) -> bool:
    return bool(op.body)


# Negative cases need a body to break (a header or path segment is always a string): others get positive ones.
CASES_TO_RUN = [(op, mode) for op in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                if mode is GenerationMode.POSITIVE or _has_inputs(op)]


@pytest.mark.parametrize("operation, mode", CASES_TO_RUN, ids=[f"{op.label}-{m.value}" for op, m in CASES_TO_RUN])
def test_openapi_operation_never_5xx(fuzz_server, served_spec, operation, mode):
    """Valid (positive) and schema-violating (negative) cases for one operation; bounded count each."""
    label = f"{operation.label} ({mode.value})"

    @fuzz_settings(12 if list(operation.iter_parameters()) or operation.body else 3)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        CASES[label] = CASES.get(label, 0) + 1
        case.call_and_validate(base_url=fuzz_server.url, timeout=60, additional_checks=[error_body_says_what_to_fix],
                               excluded_checks=[positive_data_acceptance])

    run()
