"""The OpenAPI document: valid 3.1, complete, and true to what the running API answers.

Conformance is checked by schemathesis against a real courier on 127.0.0.1 (moto + stub IdM):
a bounded, derandomised number of generated requests per operation, valid and invalid.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import hypothesis
import pytest
import schemathesis
from aiohttp import web
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.aws import AwsClients
from service.bootstrap import Resources
from service.settings import AwsSettings, Settings
from tests.test_api import VALID_BODY, Api, own_resources, running_api

MAX_EXAMPLES = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
async def api(aws: AwsClients, aws_settings: AwsSettings) -> AsyncIterator[Api]:
    settings, resources = await own_resources(aws, aws_settings)
    async with running_api(settings, resources, aws) as running:
        yield running


@pytest.fixture(scope="module")
async def document(api: Api) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{api.url}/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        served: dict[str, Any] = await response.json()
        return served


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    validate(document, cls=OpenAPIV31SpecValidator)


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route; HEAD is aiohttp's automatic twin of GET."""
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path, f"route without a path: {route!r}"
        if route.method != "HEAD":
            routes.add((route.method, path))
    return routes


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
        if method in {"get", "put", "post", "delete", "patch", "options", "head"}
    }


def test_every_route_is_documented(api: Api, document: dict[str, Any]) -> None:
    assert api.app is not None
    routes = app_routes(api.app)
    assert ("POST", "/v1/mailboxes") in routes
    assert routes == documented_routes(document)


def test_every_operation_has_an_id_and_responses(document: dict[str, Any]) -> None:
    operation_ids = []
    for operations in document["paths"].values():
        for operation in operations.values():
            operation_ids.append(operation["operationId"])
            assert operation["responses"]
    assert len(operation_ids) == len(set(operation_ids))


def run_operation(
    operation: schemathesis.APIOperation,
    base_url: str,
    token: str,
    mode: schemathesis.GenerationMode,
    seen: Counter[tuple[str, int]],
    path_parameters: dict[str, Any] | None = None,
) -> None:
    """Send ``MAX_EXAMPLES`` generated requests for ``operation`` and validate every answer."""

    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            checks=CHECKS,
            timeout=10,
        )
        seen[(operation.label, response.status_code)] += 1

    check()


def run_all(
    document: dict[str, Any], url: str, token: str, request_id: str
) -> Counter[tuple[str, int]]:
    """(operation, status) → how many generated requests got that answer.

    ``request_id`` is a real request, so the status operation is also exercised with a 200.
    """
    # From the served document as a dict: loaded from its URL, schemathesis would skip the
    # operation that serves it (GET /openapi.json).
    schema = schemathesis.openapi.from_dict(copy.deepcopy(document))
    seen: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        run_operation(operation, url, token, schemathesis.GenerationMode.POSITIVE, seen)
        raw = operation.definition.raw
        if raw.get("parameters") or raw.get("requestBody"):  # something to get wrong
            run_operation(operation, url, token, schemathesis.GenerationMode.NEGATIVE, seen)
        if "{request_id}" in operation.path:
            known = {"request_id": request_id}
            run_operation(operation, url, token, schemathesis.GenerationMode.POSITIVE, seen, known)
    return seen


async def test_responses_conform_to_the_document(api: Api, document: dict[str, Any]) -> None:
    # schemathesis sends with requests (blocking): run it in a thread so the API, which lives
    # on this event loop, can answer.
    created = await api.post({**VALID_BODY, "username": "known.request"})
    assert created.status == 202
    seen = await asyncio.to_thread(
        run_all, document, api.url, api.token(), created.body["request_id"]
    )
    operations = {label for label, _ in seen}
    assert operations == {f"{method} {path}" for method, path in documented_routes(document)}
    statuses = {
        label: {status for (other, status) in seen if other == label} for label in operations
    }
    # Generated requests got past authentication, and invalid ones were refused.
    assert 202 in statuses["POST /v1/mailboxes"]
    assert {400, 422} & statuses["POST /v1/mailboxes"]
    assert {200, 404} <= statuses["GET /v1/requests/{request_id}"]


DOCUMENT_URI = "urn:courier:openapi"


def media_types(node: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(JSON pointer, media type object) of every request and response body in the document."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = f"{pointer}/{key.replace('~', '~0').replace('/', '~1')}"
        if key == "content" and isinstance(value, dict):
            for media_type, media in value.items():
                yield f"{here}/{media_type.replace('~', '~0').replace('/', '~1')}", media
        else:
            yield from media_types(value, here)


def example_values(media: dict[str, Any]) -> dict[str, Any]:
    named = {name: example["value"] for name, example in media.get("examples", {}).items()}
    return {**named, **({"example": media["example"]} if "example" in media else {})}


def test_every_example_matches_its_schema(document: dict[str, Any]) -> None:
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    checked = 0
    for pointer, media in media_types(document):
        # Resolved inside the document, so "#/components/..." references work as in OpenAPI.
        validator = Draft202012Validator(
            {"$ref": f"{DOCUMENT_URI}#{pointer}/schema"},
            registry=registry,
            format_checker=FormatChecker(),
        )
        for name, value in example_values(media).items():
            errors = [error.message for error in validator.iter_errors(value)]
            assert not errors, f"example {name!r} at {pointer}: {errors}"
            checked += 1
    assert checked >= 9


def response_examples(document: dict[str, Any], response: dict[str, Any]) -> set[str]:
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return {name for media in response["content"].values() for name in example_values(media)}


def test_the_main_answers_have_examples(document: dict[str, Any]) -> None:
    create = document["paths"]["/v1/mailboxes"]["post"]
    assert {"minimal", "full"} <= set(
        create["requestBody"]["content"]["application/json"]["examples"]
    )
    responses = create["responses"]
    assert response_examples(document, responses["202"])
    assert response_examples(document, responses["401"]) == {"invalid-token"}
    assert response_examples(document, responses["409"]) == {
        "identity-exists",
        "request-in-progress",
    }
    assert response_examples(document, responses["422"]) == {"validation-failed"}
    assert response_examples(document, responses["503"]) == {"service-unavailable"}
    status = document["paths"]["/v1/requests/{request_id}"]["get"]["responses"]
    assert response_examples(document, status["200"])


async def test_the_examples_are_what_courier_accepts_and_answers(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    # A courier and IdM of its own: the conformance test sends the same usernames.
    async with running_api(settings, fresh, aws) as api:
        served = (await api.call("GET", "/openapi.json", authorization=None)).body
        create = served["paths"]["/v1/mailboxes"]["post"]
        examples = create["requestBody"]["content"]["application/json"]["examples"]
        for name, example in examples.items():
            reply = await api.post(example["value"])
            assert reply.status == 202, f"example {name!r}: {reply.status} {reply.body}"
            assert reply.body["status"] == "accepted"
            status = await api.call("GET", reply.headers["Location"])
            assert status.status == 200
            assert status.body["operation"] == "create-mailbox"
        refused = await api.call(
            "POST",
            "/v1/mailboxes",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            authorization=None,
        )
    problems = served["components"]["responses"]["Unauthorized"]["content"]
    missing_token = problems["application/problem+json"]["examples"]["invalid-token"]["value"]
    assert refused.status == 401
    assert {**refused.body, "request_id": missing_token["request_id"]} == missing_token
