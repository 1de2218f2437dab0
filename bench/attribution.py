"""'Where the CPU goes': py-spy's collapsed stacks of courier, attributed to components.

py-spy samples the process at a fixed rate and keeps only samples where a thread was running
(not waiting in epoll), so each sample is a slice of CPU time. Every sample gets exactly one
component; the shares are then scaled to the CPU per message (or request) measured by the
main run, so the table sums to that total.

The attribution rule (``attribute``), on a stack listed from the root to the leaf:

1. The bootstrap (``runpy``, ``service/__main__.py``, ``service/cli.py`` and the event loop's
   own ``run``/``run_forever``/``Handle._run`` frames) is dropped: what is left is the callback
   the loop was running. Nothing left: the sample is the event loop itself (uvloop's C code,
   transports, selectors).
2. Walking from the root, a frame of courier's own code (``service/...``) makes courier the
   owner; the first frame of a known component *after* courier's last frame takes over as the
   owner, and deeper frames do not change it. So botocore's own JSON parsing, hashing and
   aiohttp requests count as the AWS call they serve; ``json.dumps`` called by courier counts
   as JSON; ``logging`` calling ``json`` counts as logging.
3. A frame of a library called *back* from courier (aiohttp's server calling courier's handler,
   a middleware chain) hands ownership back to courier when courier's frame appears again.
4. Frames of no known component (plain stdlib: ``uuid``, ``re``, ``dataclasses``, ...) do not
   change the owner: under courier they are courier's own work.
5. botocore/aiobotocore frames count as DynamoDB when a courier frame above them names the
   status store or DynamoDB (``DYNAMO_CALLERS``: modules or functions matching
   dynamo/status/batch write), and as secrets when called from ``service/secrets/``; otherwise
   they are SQS/KMS (the only other services courier calls through aiobotocore). aiodynamo
   frames are DynamoDB wherever they are, so a new ``service/dynamo.py`` on aiodynamo is
   counted right without a rule of its own.

Limits, said where the table is printed: native code without a Python frame (AES-GCM in
``cryptography``'s Rust core, orjson, hashlib, uvloop's C) is counted to the Python frame that
called it; aiohttp client protocol callbacks reading responses off the socket run from the
loop with no caller on the stack, so they count as HTTP client for every caller, AWS included.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

COURIER = "courier's own code"
EVENT_LOOP = "event loop (asyncio, uvloop)"
SQS_KMS = "SQS/KMS calls (aiobotocore/botocore)"
DYNAMODB = "DynamoDB calls (botocore or aiodynamo)"
SECRETS = "secret store (CredStash: DynamoDB + KMS)"
HTTP_CLIENT = "HTTP client (aiohttp: targets, IdM)"
HTTP_SERVER = "HTTP server (aiohttp web)"
JSON = "JSON, base64"
SCHEMA = "schema validation"
CRYPTO = "crypto (cryptography, jwt, hmac)"
LOGGING = "logging"
METRICS = "prometheus metrics"
OTHER = "other"

#: The components, in the order the table lists them.
COMPONENTS = (
    SQS_KMS, DYNAMODB, SECRETS, HTTP_CLIENT, HTTP_SERVER, JSON, SCHEMA, CRYPTO, LOGGING,
    METRICS, EVENT_LOOP, COURIER, OTHER,
)  # fmt: skip

_BOTOCORE = "botocore"  # a marker, resolved to SQS/KMS, DynamoDB or secrets by the caller
# (pattern on py-spy's short file name, component); the first match wins.
_FILE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), component)
    for pattern, component in (
        (r"^service/logs\.py$", LOGGING),
        (r"^service/metrics\.py$", METRICS),
        (r"^service/", COURIER),
        (r"^aiodynamo/", DYNAMODB),
        (r"^(aiobotocore|botocore|boto3|jmespath|dateutil)/", _BOTOCORE),
        (r"^aiohttp/(client|connector|resolver|tracing|cookiejar)", HTTP_CLIENT),
        (r"^aiohttp/(web|http_websocket)", HTTP_SERVER),
        (r"^aiohttp/", "aiohttp"),  # shared by both sides: resolved by the stack
        (r"^(aiohappyeyeballs|yarl|multidict|aiosignal|frozenlist|propcache)/", "aiohttp"),
        (r"^(json|orjson|msgspec|ujson)/|^base64\.py$", JSON),
        (r"^(jsonschema|jsonschema_specifications|referencing|fastjsonschema)/", SCHEMA),
        (r"^(cryptography|jwt)/|^(hmac|hashlib|secrets)\.py$", CRYPTO),
        (r"^logging/|^(structlog|pythonjsonlogger)/", LOGGING),
        (r"^prometheus_client/", METRICS),
        (r"^(asyncio|uvloop)/|^(selectors|selector_events)\.py$", EVENT_LOOP),
    )
)
# Courier frames above a botocore call that make it a DynamoDB call (module or function).
DYNAMO_CALLERS = re.compile(r"dynamo|status|batch_?write|putbatcher", re.IGNORECASE)
_SECRETS_CALLERS = re.compile(r"^service/secrets/")
# The bootstrap: everything up to the event loop's run and its dispatch frames.
_LOOP_ENTRY = re.compile(r"^(uvloop/__init__\.py|asyncio/runners\.py)$")
_LOOP_DISPATCH = re.compile(r"^(uvloop/|asyncio/(base_events|events|runners)\.py$)")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame ``function (file:line)``; file "" when absent."""
    found = _FRAME.match(frame.strip())
    if found is None:
        return frame.strip(), ""
    return found["function"], found["file"]


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw`` output: (frames from the root, sample count) per line."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def frame_component(function: str, file: str) -> str | None:
    """``file_component``, plus validators compiled at run time (fastjsonschema's code has
    the file name ``<string>``, as dataclasses' generated methods do: told apart by name)."""
    if file == "<string>" and function.startswith("validate"):
        return SCHEMA
    return file_component(file)


def file_component(file: str) -> str | None:
    """The component a module (py-spy's short file name) belongs to; ``botocore`` and
    ``aiohttp`` are resolved by the stack (``attribute``); None for plain stdlib and unknowns."""
    for pattern, component in _FILE_RULES:
        if pattern.search(file):
            return component
    return None


def _callback(frames: Sequence[tuple[str, str]]) -> Sequence[tuple[str, str]]:
    """The frames below the event loop's dispatch (or the whole stack of a plain thread)."""
    entry = next((i for i, (_, f) in enumerate(frames) if _LOOP_ENTRY.search(f)), None)
    if entry is None:
        return frames
    rest = frames[entry:]
    skip = next((i for i, (_, f) in enumerate(rest) if not _LOOP_DISPATCH.search(f)), len(rest))
    return rest[skip:]


def _aiohttp_side(frames: Sequence[tuple[str, str]]) -> str:
    """A shared aiohttp module (streams, parser, writer) serves the side named on the stack."""
    for _, file in frames:
        side = file_component(file)
        if side in (HTTP_CLIENT, HTTP_SERVER):
            return side
    return HTTP_SERVER  # the server's protocol reads requests with no client frame around


def attribute(stack: Sequence[str]) -> str:
    """The component one sample's CPU belongs to (the rule is in the module's docstring)."""
    frames = _callback([parse_frame(frame) for frame in stack])
    if not frames:
        return EVENT_LOOP
    owner: str | None = None
    callers: list[str] = []  # courier frames so far, "file function"
    for index, (function, file) in enumerate(frames):
        component = frame_component(function, file)
        if component == COURIER:
            owner = COURIER
            callers.append(f"{file} {function}")
            continue
        if component is None or owner not in (None, COURIER):
            continue
        if component == _BOTOCORE:
            component = _botocore_caller(callers)
        elif component == "aiohttp":
            component = _aiohttp_side(frames[index:])
        owner = component
    return owner or OTHER


def _botocore_caller(callers: Sequence[str]) -> str:
    if any(_SECRETS_CALLERS.search(caller) for caller in callers):
        return SECRETS
    if any(DYNAMO_CALLERS.search(caller) for caller in callers):
        return DYNAMODB
    return SQS_KMS


def breakdown(stacks: Iterable[tuple[Sequence[str], int]]) -> Counter[str]:
    """Samples per component."""
    found: Counter[str] = Counter()
    for stack, count in stacks:
        found[attribute(stack)] += count
    return found


def courier_modules(stacks: Iterable[tuple[Sequence[str], int]]) -> Counter[str]:
    """Of the samples counted as courier's own code: samples per courier module (the innermost
    courier frame's file), to say which of courier's modules the time is in."""
    found: Counter[str] = Counter()
    for stack, count in stacks:
        if attribute(stack) != COURIER:
            continue
        files = [file for _, file in map(parse_frame, stack) if file.startswith("service/")]
        found[files[-1] if files else "?"] += count
    return found


def scaled(samples: Mapping[str, int], total_ms: float) -> list[dict[str, Any]]:
    """Each component's share of the samples, and that share of ``total_ms`` (CPU per unit).

    Rows follow ``COMPONENTS``; components with no sample are left out. The ``ms`` column
    sums to ``total_ms`` by construction: the profile gives the split, the main run the total.
    """
    total = sum(samples.values())
    if total == 0:
        return []
    rows = []
    for component in COMPONENTS:
        count = samples.get(component, 0)
        if count:
            share = count / total
            rows.append(
                {"component": component, "samples": count, "share": share, "ms": share * total_ms}
            )
    return rows
