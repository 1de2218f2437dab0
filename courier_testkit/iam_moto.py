"""moto's server with IAM enforcement and a record of every signed AWS call, in its own process.

``python -m courier_testkit.iam_moto --no-auth-requests N`` serves moto on 127.0.0.1 (a
kernel-chosen port, printed as ``moto listening http://127.0.0.1:<port>``) with
``INITIAL_NO_AUTH_ACTION_COUNT=N``: moto lets the first N requests through unauthenticated,
then checks every request's signature and the caller's IAM policies.

A WSGI middleware in front of moto (``CallRecorder``) records each signed request: access
key id, region and service (from the SigV4 credential scope), operation, parameters, HTTP
status and, for KMS, the key id of the answer. Control routes on the same port:

- ``GET /_testkit/calls?access_key_id=K``: the calls signed with ``K`` (all without it);
- ``POST /_testkit/faults``: answer the next ``count`` requests of ``access_key_id`` for one
  of ``operations`` with an AWS-shaped error (``status``, ``code``) instead of calling moto;
  ``DELETE /_testkit/faults`` disarms them all.

moto sits behind the strict layer (``courier_testkit.strict.StrictWsgi``), as in the rest of
the test-suite, so AWS's limits hold here too.

``iam_moto()`` starts it, creates an administrator within the allowance and checks that the
allowance is used up before it yields. moto 5.2 enforces only part of a policy (see
``courier_testkit.iam_policy.moto_projection``); the record is what the exact policy is
checked against.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import aiohttp

from courier_testkit.iam_policy import RecordedCall

CONTROL_PREFIX = "/_testkit/"
CREDENTIAL = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")
# Response fields worth keeping: which key KMS used (Decrypt names it only in its answer).
KEPT_RESPONSE_FIELDS = ("KeyId",)
ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
# CreateUser + PutUserPolicy + CreateAccessKey of the administrator.
SETUP_REQUESTS = 3

StartResponse = Callable[..., Any]


@dataclass
class Fault:
    """Answer the next ``remaining`` matching requests with an error."""

    access_key_id: str
    operations: frozenset[str]
    remaining: int
    status: int
    code: str


class CallRecorder:
    """WSGI middleware: records signed requests, injects faults, serves the control routes."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.calls: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL_PREFIX):
            return self._control(environ, start_response)
        body = _read_body(environ)
        call = _describe(environ, body)
        if call is None:  # unsigned (moto's dashboard, health probes): not an AWS call
            return self.app(environ, start_response)
        fault = self._take_fault(call)
        if fault is not None:
            call["status"], call["injected"] = fault.status, True
            self._keep(call)
            return _error(start_response, fault, environ)
        status: list[int] = []

        def capture(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status.append(int(line.split(maxsplit=1)[0]))
            return start_response(line, headers, exc_info)

        chunks = list(self.app(environ, capture))
        call["status"] = status[0] if status else 0
        call["response"] = _kept_response(call["service"], b"".join(chunks))
        self._keep(call)
        return chunks

    def _keep(self, call: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(call)

    def _take_fault(self, call: Mapping[str, Any]) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if (
                    fault.remaining > 0
                    and fault.access_key_id == call["access_key_id"]
                    and call["operation"] in fault.operations
                ):
                    fault.remaining -= 1
                    return fault
        return None

    def _control(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        if path == CONTROL_PREFIX + "calls" and method == "GET":
            wanted = parse_qs(environ.get("QUERY_STRING", "")).get("access_key_id", [""])[0]
            with self.lock:
                found = [c for c in self.calls if not wanted or c["access_key_id"] == wanted]
            return _json(start_response, 200, {"calls": found})
        if path == CONTROL_PREFIX + "faults" and method == "POST":
            spec = json.loads(_read_body(environ) or b"{}")
            fault = Fault(
                access_key_id=spec["access_key_id"],
                operations=frozenset(spec["operations"]),
                remaining=int(spec.get("count", 1)),
                status=int(spec.get("status", 500)),
                code=str(spec.get("code", "InternalError")),
            )
            with self.lock:
                self.faults.append(fault)
            return _json(start_response, 200, {"armed": fault.remaining})
        if path == CONTROL_PREFIX + "faults" and method == "DELETE":
            with self.lock:
                left = sum(fault.remaining for fault in self.faults)
                self.faults.clear()
            return _json(start_response, 200, {"cleared": left})
        return _json(start_response, 404, {"error": f"no control route {method} {path}"})


def _read_body(environ: dict[str, Any]) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body: bytes = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
    return body


def _describe(environ: Mapping[str, Any], body: bytes) -> dict[str, Any] | None:
    found = CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    if found is None:
        return None
    access_key_id, region, service = found.groups()
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    params: dict[str, Any] = {}
    if body and "json" in environ.get("CONTENT_TYPE", ""):
        with contextlib.suppress(ValueError):
            params = json.loads(body)
    elif body:
        params = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    operation = target.rsplit(".", 1)[-1] if target else params.get("Action") or query.get("Action")
    return {
        "access_key_id": access_key_id,
        "region": region,
        "service": service,
        "operation": operation or f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}",
        "params": params,
    }


def _kept_response(service: str, body: bytes) -> dict[str, Any]:
    if service != "kms" or not body:
        return {}
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return {
        k: document[k] for k in KEPT_RESPONSE_FIELDS if isinstance(document, dict) and k in document
    }


def _json(start_response: StartResponse, status: int, document: Any) -> list[bytes]:
    payload = json.dumps(document).encode()
    start_response(f"{status} X", [("Content-Type", "application/json")])
    return [payload]


def _error(start_response: StartResponse, fault: Fault, environ: Mapping[str, Any]) -> list[bytes]:
    document = {"__type": fault.code, "message": "injected by courier_testkit.iam_moto"}
    headers = [
        ("Content-Type", environ.get("CONTENT_TYPE") or "application/x-amz-json-1.0"),
        ("x-amzn-query-error", f"{fault.code};Receiver"),
    ]
    start_response(f"{fault.status} Injected", headers)
    return [json.dumps(document).encode()]


def serve(no_auth_requests: int) -> None:
    """Run moto behind ``CallRecorder`` until killed (the ``python -m`` entry point)."""
    # moto reads the allowance when its settings module is first imported.
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(no_auth_requests)
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from courier_testkit.strict import StrictWsgi

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Outside the strict layer, so the record also holds what that layer refuses.
    app = CallRecorder(StrictWsgi(DomainDispatcherApplication(create_backend_app)))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"moto listening http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


# --------------------------------------------------------------------------------------
# The test side
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """An IAM user's access key."""

    access_key_id: str
    secret_access_key: str

    def env(self) -> dict[str, str]:
        """As the environment variables botocore reads."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }


@dataclass
class IamMoto:
    """A running ``iam_moto`` server: its URL, the administrator's key, and its record."""

    url: str
    admin: Credentials
    region: str = "us-east-1"

    def client(self, service: str, credentials: Credentials) -> Any:
        """An aiobotocore client context manager for ``service`` signing as ``credentials``."""
        from aiobotocore.session import get_session

        return get_session().create_client(
            service,
            region_name=self.region,
            endpoint_url=self.url,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
        )

    async def create_user(self, name: str, policy: Mapping[str, Any]) -> Credentials:
        """An IAM user with ``policy`` inline (created by the administrator) and its key."""
        async with self.client("iam", self.admin) as iam:
            await iam.create_user(UserName=name)
            await iam.put_user_policy(
                UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy)
            )
            created = await iam.create_access_key(UserName=name)
        key = created["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    async def calls(self, credentials: Credentials) -> list[RecordedCall]:
        """Every call signed with ``credentials`` so far, in order."""
        document = await self._control("GET", f"calls?access_key_id={credentials.access_key_id}")
        return [RecordedCall.from_json(call) for call in document["calls"]]

    async def fail_next(
        self,
        credentials: Credentials,
        operations: Iterable[str],
        count: int,
        *,
        status: int = 500,
        code: str = "InternalError",
    ) -> None:
        """Answer the next ``count`` ``operations`` signed with ``credentials`` with an error."""
        spec = {
            "access_key_id": credentials.access_key_id,
            "operations": list(operations),
            "count": count,
            "status": status,
            "code": code,
        }
        await self._control("POST", "faults", spec)

    async def clear_faults(self) -> int:
        """Disarm every fault; returns how many injections were still due."""
        document = await self._control("DELETE", "faults")
        return int(document["cleared"])

    async def _control(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.request(method, f"{self.url}{CONTROL_PREFIX}{path}", json=body) as response,
        ):
            assert response.status == 200, await response.text()
            return await response.json()


@contextlib.asynccontextmanager
async def iam_moto(region: str = "us-east-1") -> AsyncIterator[IamMoto]:
    """The server in its own process, an administrator created, enforcement checked on."""
    from .processes import managed, python_env, wait_http

    argv = [sys.executable, "-m", "courier_testkit.iam_moto", "--no-auth-requests"]
    argv.append(str(SETUP_REQUESTS))
    async with managed(argv, name="moto-iam", env=python_env()) as process:
        found = await process.wait_for_output(r"moto listening (http://127\.0\.0\.1:\d+)")
        await wait_http(found[1] + "/moto-api/", process=process)
        bootstrap = IamMoto(found[1], Credentials("setup", "setup"), region)
        admin = await bootstrap.create_user("admin", ADMIN_POLICY)
        server = IamMoto(found[1], admin, region)
        await _assert_enforcing(server)
        yield server


async def _assert_enforcing(server: IamMoto) -> None:
    """A key moto never issued is refused: the unauthenticated allowance is used up."""
    from botocore.exceptions import ClientError

    async with server.client("iam", Credentials("AKIAUNKNOWN", "unknown")) as iam:
        try:
            await iam.list_users()
        except ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 403:
                return
            raise
    raise AssertionError("moto accepted an unknown access key: IAM is not enforced")


def main(argv: list[str] | None = None) -> int:
    """``python -m courier_testkit.iam_moto --no-auth-requests N``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--no-auth-requests", type=int, default=SETUP_REQUESTS)
    args = parser.parse_args(argv)
    serve(args.no_auth_requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
