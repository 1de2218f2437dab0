"""``/metrics`` of a running courier: exactly the families the README lists, in base units."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from prometheus_client import Counter

from service.aws import AwsClients
from service.bootstrap import Resources
from service.metrics import LabelCache
from service.settings import Settings
from tests.chain import REPO, mailbox, running_chain

TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? \S+$", re.MULTILINE)
LABEL_NAME = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="(?:[^"\\]|\\.)*"')
README_ROW = re.compile(r"^\| `(courier_\w+)` \| (\w+) \| ([^|]*) \|", re.MULTILINE)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Units and scales Prometheus' naming rules exclude: base units only (seconds, bytes).
NOT_BASE_UNITS = {
    "ms",
    "msec",
    "millis",
    "milliseconds",
    "us",
    "microseconds",
    "ns",
    "nanoseconds",
    "minutes",
    "hours",
    "days",
    "kb",
    "kib",
    "mb",
    "mib",
    "gb",
    "percent",
}
# A name with one of these words measures time: it must say so in seconds.
TIME_WORDS = {"duration", "latency", "lag", "age", "time", "timeout", "delay", "wait", "seconds"}
SIZE_WORDS = {"size", "length", "bytes"}


@dataclass(frozen=True)
class Family:
    """One metric family: its type and label names (``le`` of histogram buckets left out)."""

    type: str
    labels: frozenset[str]


def documented() -> dict[str, Family]:
    """The README's table under ``## Metrics``."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    families = {}
    for name, kind, labels in README_ROW.findall(section):
        assert name not in families, f"{name} is listed twice"
        families[name] = Family(kind, frozenset(re.findall(r"`(\w+)`", labels)))
    assert families, "README.md has no metric table under ## Metrics"
    return families


def scraped(text: str) -> dict[str, Family]:
    """The courier_* families of a Prometheus text exposition, with the labels their samples use."""
    types = {name: kind for name, kind in TYPE_LINE.findall(text) if name.startswith("courier_")}
    labels: dict[str, set[str]] = {name: set() for name in types}
    for sample, label_text in SAMPLE_LINE.findall(text):
        family = _family_of(sample, types)
        if family is not None:
            labels[family] |= set(LABEL_NAME.findall(label_text)) - {"le"}
    return {name: Family(kind, frozenset(labels[name])) for name, kind in types.items()}


def _family_of(sample: str, types: dict[str, str]) -> str | None:
    if sample in types:
        return sample
    for suffix in HISTOGRAM_SUFFIXES:
        base = sample.removesuffix(suffix)
        if base != sample and types.get(base) == "histogram":
            return base
    return None


def unit_problems(name: str, kind: str) -> list[str]:
    """Why ``name`` breaks Prometheus' naming rules (base units, ``_total`` on counters)."""
    words = name.split("_")
    problems = [f"unit {word!r} is not a base unit" for word in words if word in NOT_BASE_UNITS]
    if (kind == "counter") != name.endswith("_total"):
        problems.append("counters, and only counters, end in _total")
    stem = name.removesuffix("_total")
    if TIME_WORDS & set(words) and not stem.endswith("_seconds"):
        problems.append("a time must end in _seconds")
    if SIZE_WORDS & set(words) and not stem.endswith("_bytes"):
        problems.append("a size must end in _bytes")
    if name.endswith("_created"):
        problems.append("_created series double every counter and histogram")
    return problems


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("courier_http_request_duration_ms", "histogram"),
        ("courier_http_requests", "counter"),
        ("courier_ready_total", "gauge"),
        ("courier_message_queue_lag", "histogram"),
        ("courier_body_size", "histogram"),
        ("courier_http_requests_created", "gauge"),
        ("courier_secret_age_minutes", "gauge"),
    ],
)
def test_the_unit_rules_catch_what_they_should(name: str, kind: str) -> None:
    assert unit_problems(name, kind), name


async def test_metrics_are_exactly_the_documented_families_in_base_units(
    settings: Settings, fresh: Resources, aws: AwsClients
) -> None:
    async with running_chain(settings, fresh, aws) as chain:
        request_id = await chain.create(mailbox(90))
        await chain.wait_status(request_id, "completed", timeout=20)
        async with chain.http.get(f"{chain.url}/v1/nope") as response:
            assert response.status == 404
        async with chain.http.get(f"{chain.url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()

    # The scrape is live: the traffic above shows.
    assert re.search(r'^courier_messages_processed_total\{outcome="completed"\} [1-9]', text, re.M)
    assert re.search(r'^courier_http_requests_total\{.*status="404"', text, re.M)

    exposed, listed = scraped(text), documented()
    assert sorted(set(exposed) - set(listed)) == [], "served but not in README.md"
    assert sorted(set(listed) - set(exposed)) == [], "in README.md but not served"
    for name, family in exposed.items():
        assert family.type == listed[name].type, (name, family.type, listed[name].type)
        # Label sets are checked on the samples the traffic produced (some families have none).
        assert family.labels <= listed[name].labels, (name, family.labels, listed[name].labels)
        assert unit_problems(name, family.type) == [], name
    # Only courier_* and the client library's own process_/python_ families.
    others = {name.split("_")[0] for name, _ in TYPE_LINE.findall(text)} - {"courier"}
    assert others <= {"process", "python"}, others


def test_every_family_labelled_in_readme_is_labelled_in_code() -> None:
    """Labels of families the short traffic above leaves without samples: from the registry."""
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401  (declares every courier_* metric)

    listed = documented()
    collectors = {id(c): c for c in REGISTRY._names_to_collectors.values()}.values()
    for collector in collectors:
        name = getattr(collector, "_name", "")
        if not name.startswith("courier_"):
            continue
        exposed = name + "_total" if getattr(collector, "_type", "") == "counter" else name
        labels = frozenset(getattr(collector, "_labelnames", ()))
        assert exposed in listed, exposed
        assert labels == listed[exposed].labels, (exposed, labels, listed[exposed].labels)


def test_label_cache_returns_the_labelled_child_and_stays_bounded() -> None:
    counter = Counter("courier_test_label_cache_total", "test", ["a"], registry=None)
    children = LabelCache(counter, limit=2)
    assert children("x") is counter.labels("x")
    assert children("x") is children("x")
    for value in ("y", "z", "w"):  # past the limit: still the right child, not remembered
        children(value).inc()
    assert counter.labels("w")._value.get() == 1
    assert len(children._children) == 2
