"""The bench's 'where the CPU goes' table: which component each py-spy sample is counted to,
that the table sums to the measured CPU, and that the flame graph draws the same stacks.

Stacks are written the way ``py-spy record --format raw`` prints them (root first); no
process is profiled here, so these run in milliseconds.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from bench import attribution, flame, report

BOOT = [
    "_run_module_as_main (<frozen runpy>:198)",
    "<module> (service/__main__.py:3)",
    "main (service/cli.py:102)",
    "run_async (service/cli.py:28)",
    "run (uvloop/__init__.py:92)",
    "Runner.run (asyncio/runners.py:118)",
]
HANDLER = [
    "RequestHandler._handle_request (aiohttp/web_protocol.py:577)",
    "Application._handle (aiohttp/web_app.py:563)",
    "observe (service/api/middleware.py:45)",
    "create (service/api/mailboxes.py:87)",
]
BOTOCORE_CALL = [
    "with_current_context.<locals>.decorator.<locals>.wrapper (aiobotocore/context.py:36)",
    "AioBaseClient._make_api_call (aiobotocore/client.py:400)",
    "RequestSigner.sign (botocore/signers.py:200)",
    "dumps (json/__init__.py:231)",
]


def owner(*frames: str) -> str:
    return attribute_stack([*BOOT, *frames])


def attribute_stack(frames: list[str]) -> str:
    line = ";".join(frames) + " 1"
    [(stack, _)] = attribution.parse_collapsed(line)
    return attribution.attribute(stack)


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        ("StatusStore.update (service/status.py:120)", attribution.DYNAMODB),
        ("PutBatcher._flush (service/batch_writes.py:80)", attribution.DYNAMODB),
        ("Producer._send_batch (service/queue.py:90)", attribution.SQS_KMS),
        ("EnvelopeCipher._generate (service/envelope.py:240)", attribution.SQS_KMS),
        ("CredstashStore._latest (service/secrets/credstash.py:70)", attribution.SECRETS),
    ],
)
def test_botocore_counts_as_the_service_courier_called_it_for(caller: str, expected: str) -> None:
    assert owner(*HANDLER, caller, *BOTOCORE_CALL) == expected


def test_aiodynamo_is_dynamodb_from_any_module_even_a_new_one() -> None:
    stack = [
        "Dynamo.update (service/tables/records.py:10)",
        "Client.update_item (aiodynamo/client.py:300)",
        "HTTP.post (aiodynamo/http/aiohttp.py:40)",
        "ClientSession._request (aiohttp/client.py:600)",
    ]
    assert owner(*HANDLER, *stack) == attribution.DYNAMODB


def test_the_first_component_below_courier_owns_the_sample() -> None:
    log_json = ["Logger.info (logging/__init__.py:1489)", "dumps (json/__init__.py:231)"]
    assert owner(*HANDLER, *log_json) == attribution.LOGGING
    assert owner(*HANDLER, "dumps (json/__init__.py:231)") == attribution.JSON
    assert owner(*HANDLER, "JsonFormatter.format (service/logs.py:50)") == attribution.LOGGING
    assert owner(*HANDLER, "encode (jwt/api_jwt.py:50)") == attribution.CRYPTO
    assert owner(*HANDLER, "validate_schema (<string>:3)") == attribution.SCHEMA
    assert owner(*HANDLER, "Counter.inc (prometheus_client/metrics.py:300)") == attribution.METRICS


def test_courier_code_and_the_stdlib_it_calls_are_courier_own() -> None:
    assert owner(*HANDLER) == attribution.COURIER
    assert owner(*HANDLER, "uuid4 (uuid.py:723)") == attribution.COURIER


def test_library_code_with_no_courier_frame_is_its_own_component() -> None:
    assert owner() == attribution.EVENT_LOOP
    assert owner(HANDLER[0]) == attribution.HTTP_SERVER
    assert owner("ResponseHandler.data_received (aiohttp/client_proto.py:300)") == (
        attribution.HTTP_CLIENT
    )
    # A shared aiohttp module takes the side named deeper on the stack.
    shared = "StreamReader.feed_data (aiohttp/streams.py:300)"
    assert owner(shared, "ClientResponse.start (aiohttp/client_reqrep.py:1)") == (
        attribution.HTTP_CLIENT
    )
    assert owner("Thread.run (threading.py:982)") == attribution.OTHER


def test_the_table_splits_the_measured_total_and_sums_to_it() -> None:
    samples = {attribution.SQS_KMS: 30, attribution.COURIER: 50, attribution.JSON: 20}
    rows = attribution.scaled(samples, 2.0)
    assert [row["component"] for row in rows] == [
        attribution.SQS_KMS,
        attribution.JSON,
        attribution.COURIER,
    ]
    assert sum(row["ms"] for row in rows) == pytest.approx(2.0)
    assert rows[0]["ms"] == pytest.approx(0.6)
    profile = {
        "worker": {"breakdown": rows, "measured_ms_per_unit": 2.0, "rate_hz": 250},
        "api": {"breakdown": attribution.scaled({attribution.HTTP_SERVER: 1}, 0.5)},
    }
    profile["api"]["measured_ms_per_unit"] = 0.5
    table = report.cpu_table({"profile": profile})
    assert "| SQS/KMS calls (aiobotocore/botocore) | 0.600 (30%) |  |" in table
    assert "| HTTP server (aiohttp web) |  | 0.500 (100%) |" in table
    assert "| **total (measured)** | **2.000** | **0.500** |" in table


def test_a_skipped_profile_says_so() -> None:
    assert "not profiled (--no-profile)" in report.cpu_table(
        {"profile": {"skipped": "--no-profile"}}
    )


def test_the_flame_graph_is_svg_with_a_box_per_frame() -> None:
    text = "\n".join(
        [
            ";".join([*BOOT, *HANDLER]) + " 3",
            ";".join([*BOOT, *HANDLER, *BOTOCORE_CALL]) + " 1",
        ]
    )
    svg = flame.render(attribution.parse_collapsed(text), "test")
    root = ET.fromstring(svg)
    titles = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert titles[0] == "all: 4 samples (100.0%)"
    assert "create (service/api/mailboxes.py): 4 samples (100.0%)" in titles
    assert "RequestSigner.sign (botocore/signers.py): 1 samples (25.0%)" in titles


def test_courier_own_samples_are_named_by_module() -> None:
    text = "\n".join(
        [
            ";".join([*BOOT, *HANDLER]) + " 3",
            ";".join([*BOOT, *HANDLER, "StatusStore.put (service/status.py:1)"]) + " 2",
            ";".join([*BOOT, *HANDLER, *BOTOCORE_CALL]) + " 5",
        ]
    )
    found = attribution.courier_modules(attribution.parse_collapsed(text))
    assert found == {"service/api/mailboxes.py": 3, "service/status.py": 2}
