"""Monthly cost of a daily volume: courier on EC2 next to API Gateway + Lambda + SQS.

Measured inputs come from a benchmark report (``--report bench/results-latest.json``):
courier's CPU per API request and per worker message (so capacity per instance is what the
instance's vCPUs can do, the AWS services being remote), and its SQS requests per message
and KMS calls per 1,000. The serverless side uses the same SQS/DynamoDB shape, the KMS
calls measured in courier's stateless mode (what a function that caches nothing pays), and
Lambda durations given as inputs. Prices are inputs with defaults: list prices, us-east-1,
on-demand, as the author believed them in mid-2025 (PRICES_AS_OF) — override any of them.

Rule of thumb applied: serverless is the better choice while its cost is below the EC2
cost plus 40% (it buys less operations work); above that, EC2 wins.

    python -m bench.cost --daily-messages 5000000 --report bench/results-latest.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PRICES_AS_OF = "2025-06 (list prices as the author believed them then; verify before relying)"
HOURS_PER_MONTH = 730
DAYS_PER_MONTH = 30.4
SERVERLESS_MARGIN = 1.40


@dataclass
class Prices:
    """USD, us-east-1, on-demand."""

    instance_hourly: float = 0.0893  # c7i.large, 2 vCPU
    instance_vcpus: int = 2
    alb_hourly: float = 0.0225
    alb_lcu_hourly: float = 0.008
    sqs_per_million: float = 0.40  # standard queue, after the free tier
    kms_per_10k: float = 0.03
    dynamodb_write_per_million: float = 0.625  # on-demand WRU (since Nov 2024)
    dynamodb_read_per_million: float = 0.125
    apigw_per_million: float = 1.00  # HTTP API (REST API: 3.50)
    lambda_per_million: float = 0.20
    lambda_gb_second: float = 0.0000166667  # x86


@dataclass
class Workload:
    """The volume and how it is served."""

    daily_messages: float = 5_000_000
    peak_to_average: float = 3.0
    target_utilisation: float = 0.6  # of each vCPU at peak
    min_instances: int = 2  # two AZs
    # courier, measured (defaults are placeholders until a report is given)
    api_cpu_ms: float = 2.5
    worker_cpu_ms: float = 2.3
    api_sqs_per_message: float = 0.14
    worker_sqs_per_message: float = 0.25
    kms_per_1000: float = 0.2
    # serverless, inputs (KMS per 1,000 from courier's stateless mode when a report is given)
    sync_lambda_ms: float = 120.0
    async_lambda_ms_per_message: float = 60.0  # three 20 ms calls in sequence
    lambda_memory_gb: float = 0.5
    lambda_batch_size: int = 10
    serverless_kms_per_1000: float = 4000.0
    serverless_secret_reads_per_message: float = 2.0


def from_report(path: Path, workload: Workload) -> Workload:
    """``workload`` with courier's measured figures taken from a benchmark report file."""
    return from_report_data(json.loads(path.read_text()), workload)


def from_report_data(report: dict[str, Any], workload: Workload) -> Workload:
    """``workload`` with courier's measured figures taken from a benchmark report."""
    workers = report["workers"]["summary"].get("20", {})
    courier = workers.get("courier", {})
    api = report["api"]["saturation"]["summary"]
    if courier:
        workload.worker_cpu_ms = courier["cpu_s_per_1000"]["median"]
        workload.worker_sqs_per_message = courier["sqs_requests_per_message"]["median"]
    if "courier" in api:
        workload.api_cpu_ms = api["courier"]["server_cpu_s_per_1000"]["median"]
        workload.api_sqs_per_message = api["courier"]["sqs_requests_per_request"]["median"]
        workload.kms_per_1000 = api["courier"]["kms_calls_per_1000"]["median"] + (
            courier.get("kms_calls_per_1000", {}).get("median", 0.0)
        )
    stateless = next(
        (api[v] for v in ("stateless", "stateless-1") if "rps" in api.get(v, {})), None
    )
    if stateless:
        # The function seals with a fresh data key and reads secrets per call (measured), and
        # the async function decrypts that data key once per message.
        workload.serverless_kms_per_1000 = stateless["kms_calls_per_1000"]["median"] + 1000
    return workload


def ec2_monthly(w: Workload, p: Prices) -> dict[str, float]:
    """courier on EC2: instances for the peak, ALB, and the per-message AWS requests."""
    monthly = w.daily_messages * DAYS_PER_MONTH
    average = w.daily_messages / 86400
    peak = average * w.peak_to_average
    cpu_seconds = (w.api_cpu_ms + w.worker_cpu_ms) / 1000
    per_instance = p.instance_vcpus * w.target_utilisation / cpu_seconds
    instances = max(w.min_instances, math.ceil(peak / per_instance))
    # Worst case for the ALB: a new connection per request (25 new connections/s = 1 LCU).
    lcus = max(1.0, average / 25)
    costs = {
        "instances": instances * p.instance_hourly * HOURS_PER_MONTH,
        "alb": (p.alb_hourly + lcus * p.alb_lcu_hourly) * HOURS_PER_MONTH,
        "sqs": monthly
        * (w.api_sqs_per_message + w.worker_sqs_per_message)
        * p.sqs_per_million
        / 1e6,
        "kms": monthly * w.kms_per_1000 / 1000 * p.kms_per_10k / 1e4,
        "dynamodb": monthly * 2 * p.dynamodb_write_per_million / 1e6,
    }
    return {**costs, "total": sum(costs.values()), "instance_count": instances,
            "msgs_per_s_per_instance": per_instance, "peak_msgs_per_s": peak}  # fmt: skip


def serverless_monthly(w: Workload, p: Prices) -> dict[str, float]:
    """API Gateway -> sync Lambda -> SQS -> async Lambda (event source mapping, batches)."""
    monthly = w.daily_messages * DAYS_PER_MONTH
    invocations = monthly * (1 + 1 / w.lambda_batch_size)
    gb_seconds = (
        monthly * (w.sync_lambda_ms + w.async_lambda_ms_per_message) / 1000 * w.lambda_memory_gb
    )
    # send 1; receive and delete once per batch; plus the idle long polls of the mapping.
    sqs_requests = monthly * (1 + 2 / w.lambda_batch_size) + 5 * 3 * 60 * HOURS_PER_MONTH
    costs = {
        "api_gateway": monthly * p.apigw_per_million / 1e6,
        "lambda_requests": invocations * p.lambda_per_million / 1e6,
        "lambda_duration": gb_seconds * p.lambda_gb_second,
        "sqs": sqs_requests * p.sqs_per_million / 1e6,
        "kms": monthly * w.serverless_kms_per_1000 / 1000 * p.kms_per_10k / 1e4,
        "dynamodb": monthly * (2 * p.dynamodb_write_per_million
                               + w.serverless_secret_reads_per_message * p.dynamodb_read_per_million) / 1e6,
    }  # fmt: skip
    return {**costs, "total": sum(costs.values())}


def compare(w: Workload, p: Prices) -> dict[str, Any]:
    """Both monthly costs and the verdict of the 40% rule."""
    ec2, serverless = ec2_monthly(w, p), serverless_monthly(w, p)
    threshold = ec2["total"] * SERVERLESS_MARGIN
    winner = "serverless" if serverless["total"] < threshold else "ec2"
    return {
        "prices_as_of": PRICES_AS_OF,
        "prices": asdict(p),
        "workload": asdict(w),
        "ec2": ec2,
        "serverless": serverless,
        "rule": "serverless wins while its cost < EC2 cost + 40%",
        "threshold": threshold,
        "winner": winner,
        "break_even_daily_messages": break_even(w, p),
    }


def break_even(w: Workload, p: Prices) -> float | None:
    """The daily volume above which EC2 wins by the 40% rule (None if not within 1e3..1e11)."""
    low, high = 1e3, 1e11

    def serverless_wins(volume: float) -> bool:
        probe = Workload(**{**asdict(w), "daily_messages": volume})
        return (
            serverless_monthly(probe, p)["total"]
            < ec2_monthly(probe, p)["total"] * SERVERLESS_MARGIN
        )

    if not serverless_wins(low) or serverless_wins(high):
        return None
    for _ in range(80):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if serverless_wins(middle) else (low, middle)
    return high


def render(result: dict[str, Any]) -> str:
    """A plain-text account of one comparison."""
    w, ec2, sls = result["workload"], result["ec2"], result["serverless"]
    lines = [
        f"daily volume {w['daily_messages']:,.0f} messages (peak {ec2['peak_msgs_per_s']:.0f} msg/s); "
        f"prices: {result['prices_as_of']}",
        f"EC2 (courier): {ec2['instance_count']} x instance at {ec2['msgs_per_s_per_instance']:.0f} msg/s each "
        f"= ${ec2['total']:,.2f}/month  "
        + ", ".join(
            f"{k} ${v:,.2f}"
            for k, v in ec2.items()
            if k in ("instances", "alb", "sqs", "kms", "dynamodb")
        ),
        f"serverless: ${sls['total']:,.2f}/month  "
        + ", ".join(f"{k} ${v:,.2f}" for k, v in sls.items() if k != "total"),
        f"rule: {result['rule']} (threshold ${result['threshold']:,.2f}) -> {result['winner'].upper()} wins",
    ]
    if result["break_even_daily_messages"]:
        lines.append(
            f"break-even: EC2 wins above ~{result['break_even_daily_messages']:,.0f} messages/day"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--report", type=Path, help="benchmark report JSON for courier's measured figures"
    )
    for cls in (Workload, Prices):
        for item in fields(cls):
            parser.add_argument(
                f"--{item.name.replace('_', '-')}", type=type(item.default), default=None
            )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    workload, prices = Workload(), Prices()
    if args.report:
        workload = from_report(args.report, workload)
    for target in (workload, prices):
        for item in fields(target):
            value = getattr(args, item.name)
            if value is not None:
                setattr(target, item.name, value)
    result = compare(workload, prices)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
