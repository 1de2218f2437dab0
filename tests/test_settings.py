"""Settings: defaults, precedence, and the one-line error for every kind of bad value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import SettingsError
from service.settings import Settings, describe, load_settings


def load(
    env: dict[str, str] | None = None, toml: str | None = None, tmp_path: Path | None = None
) -> Settings:
    path = None
    if toml is not None:
        assert tmp_path is not None
        path = tmp_path / "courier.toml"
        path.write_text(toml)
    return load_settings(path, environ=env or {})


def test_defaults_are_valid() -> None:
    settings = load()
    assert settings.role == "all"
    assert settings.http.port == 8080
    assert settings.secrets.table == "credential-store"
    assert settings.targets == ()


def test_env_overrides_toml(tmp_path: Path) -> None:
    settings = load(
        {"COURIER_HTTP_PORT": "9000", "COURIER_LOG_LEVEL": "debug"},
        '[http]\nport = 8000\nhost = "0.0.0.0"\n[log]\nlevel = "WARNING"\n',
        tmp_path,
    )
    assert settings.http.port == 9000
    assert settings.http.host == "0.0.0.0"
    assert settings.log.level == "DEBUG"


def test_lists_bools_and_targets(tmp_path: Path) -> None:
    settings = load(
        {"COURIER_SECRETS_PREFETCH": "a, b", "COURIER_HTTP_REUSE_PORT": "no"},
        '[[targets]]\nname = "crm"\nurl = "http://crm.internal/api"\n'
        '[[targets]]\nname = "billing"\nurl = "https://billing/soap"\nformat = "soap"\n',
        tmp_path,
    )
    assert settings.secrets.prefetch == ("a", "b")
    assert settings.http.reuse_port is False
    assert [(t.name, t.format) for t in settings.targets] == [("crm", "json"), ("billing", "soap")]


def test_targets_from_env_json() -> None:
    settings = load({"COURIER_TARGETS": '[{"name": "a", "url": "http://a/x", "concurrency": 4}]'})
    assert settings.targets[0].concurrency == 4


def test_endpoint_for_service() -> None:
    settings = load(
        {
            "COURIER_AWS_ENDPOINT_URL": "http://127.0.0.1:1",
            "COURIER_AWS_SQS_ENDPOINT_URL": "http://127.0.0.1:2",
        }
    )
    assert settings.aws.endpoint_for("sqs") == "http://127.0.0.1:2"
    assert settings.aws.endpoint_for("kms") == "http://127.0.0.1:1"
    assert load().aws.endpoint_for("kms") is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"COURIER_HTTP_PORT": "abc"},
            "invalid setting http.port (COURIER_HTTP_PORT) = 'abc': expected an integer between 0 and 65535",
        ),
        (
            {"COURIER_HTTP_PORT": "70000"},
            "invalid setting http.port (COURIER_HTTP_PORT) = '70000': expected an integer between 0 and 65535",
        ),
        (
            {"COURIER_ROLE": "both"},
            "invalid setting role (COURIER_ROLE) = 'both': expected one of all, api, worker",
        ),
        (
            {"COURIER_LOG_LEVEL": "loud"},
            "invalid setting log.level (COURIER_LOG_LEVEL) = 'loud': expected one of DEBUG, INFO, WARNING, ERROR",
        ),
        (
            {"COURIER_HTTP_REUSE_PORT": "maybe"},
            "invalid setting http.reuse_port (COURIER_HTTP_REUSE_PORT) = 'maybe': expected a boolean (true/false)",
        ),
        (
            {"COURIER_SECRETS_TTL_SECONDS": "0"},
            "invalid setting secrets.ttl_seconds (COURIER_SECRETS_TTL_SECONDS) = '0': expected a number between 1 and 86400",
        ),
        (
            {"COURIER_WORKER_WAIT_SECONDS": "21"},
            "invalid setting worker.wait_seconds (COURIER_WORKER_WAIT_SECONDS) = '21': expected an integer between 1 and 20",
        ),
        (
            {"COURIER_IDM_URL": "idm.internal"},
            "invalid setting idm.url (COURIER_IDM_URL) = 'idm.internal': expected an http(s) URL",
        ),
        (
            {"COURIER_AWS_ENDPOINT_URL": "ftp://x"},
            "invalid setting aws.endpoint_url (COURIER_AWS_ENDPOINT_URL) = 'ftp://x': expected an http(s) URL",
        ),
        ({"COURIER_TARGETS": "[oops"}, "invalid setting targets (COURIER_TARGETS): not JSON"),
        (
            {"COURIER_TARGETS": '{"name": "a"}'},
            "invalid setting targets = {'name': 'a'}: expected a list of tables",
        ),
        (
            {
                "COURIER_TARGETS": '[{"name": "a", "url": "http://a"}, {"name": "a", "url": "http://b"}]'
            },
            "invalid setting targets[1].name = 'a': names must be unique",
        ),
        (
            {"COURIER_TARGETS": '[{"url": "http://a"}]'},
            "invalid setting targets[0].name = '': expected a name",
        ),
        (
            {"COURIER_TARGETS": '[{"name": "a", "url": "http://a", "format": "xml"}]'},
            "invalid setting targets[0].format = 'xml': expected one of json, soap",
        ),
    ],
)
def test_invalid_env_values_give_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(env)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[http]\nport = 8080.5\n",
            "invalid setting http.port = 8080.5: expected an integer between 0 and 65535",
        ),
        (
            "[http]\nport = true\n",
            "invalid setting http.port = True: expected an integer between 0 and 65535",
        ),
        ("[http]\nhost = 5\n", "invalid setting http.host = 5: expected a string"),
        ("[http]\nprot = 1\n", "unknown setting 'prot' in [http] of the config file"),
        ("colour = 1\n", "unknown setting 'colour' in the top level of the config file"),
        ("http = 3\n", "invalid setting [http]: expected a table, got 3"),
        (
            "[secrets]\nprefetch = [1]\n",
            "invalid setting secrets.prefetch = [1]: expected a list of strings",
        ),
        ("[http\n", "config file"),
        (
            '[[targets]]\nname = "crm"\nurl = "http://crm"\nconcurrency = 4\nconcurrency_min = 8\n',
            "invalid setting targets[0].concurrency_min = 8: more than its concurrency (4)",
        ),
        (
            '[[targets]]\nname = "crm"\nurl = "http://crm"\nlimit = "greedy"\n',
            "invalid setting targets[0].limit = 'greedy': expected one of adaptive, fixed",
        ),
    ],
)
def test_invalid_toml_values_give_one_line(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(toml=toml, tmp_path=tmp_path)
    assert str(caught.value).startswith(message)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"config file .*nope.toml: not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_config_path_from_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('role = "worker"\n')
    assert load_settings(environ={"COURIER_CONFIG": str(path)}).role == "worker"


def test_settings_are_frozen() -> None:
    settings = load()
    with pytest.raises(AttributeError):
        settings.role = "api"  # type: ignore[misc]


def test_describe_covers_every_section() -> None:
    names = {row[0] for row in describe()}
    assert {
        "role",
        "http.port",
        "aws.region",
        "secrets.ttl_seconds",
        "worker.max_in_flight",
    } <= names


# --- the real `courier` command: check refuses exactly what run refuses ----------------------

COURIER = Path(sys.executable).with_name("courier")  # the console script beside the venv's python
README = Path(__file__).parent.parent / "README.md"
# What every role needs; nothing listens there, and nothing below gets far enough to call it.
RUNNABLE = {
    "COURIER_QUEUE_URL": "http://127.0.0.1:9/000000000000/work",
    "COURIER_QUEUE_DLQ_URL": "http://127.0.0.1:9/000000000000/dlq",
    "COURIER_TARGETS": '[{"name": "crm", "url": "http://127.0.0.1:9/crm"}]',
}


def courier(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``courier ARGS`` with no settings but ``env`` (no config file, no other COURIER_*)."""
    assert COURIER.exists(), f"{COURIER} is missing: install courier in this venv (make install)"
    return subprocess.run(
        [str(COURIER), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,  # a run that was not refused would serve until killed
        check=False,
    )


REFUSED = {
    "bad-value": (
        {**RUNNABLE, "COURIER_HTTP_PORT": "zero"},
        [],
        "invalid setting http.port (COURIER_HTTP_PORT) = 'zero': expected an integer between 0 and 65535",
    ),
    "no-queue": ({}, [], "queue.url (COURIER_QUEUE_URL) is required to run the API or the worker"),
    "api-without-queue": (
        {"COURIER_QUEUE_DLQ_URL": RUNNABLE["COURIER_QUEUE_DLQ_URL"]},
        ["--role", "api"],
        "queue.url (COURIER_QUEUE_URL) is required to run the API or the worker",
    ),
    "worker-without-dlq": (
        {"COURIER_QUEUE_URL": RUNNABLE["COURIER_QUEUE_URL"]},
        ["--role", "worker"],
        "queue.dlq_url (COURIER_QUEUE_DLQ_URL) is required to run the worker",
    ),
    "all-without-targets": (
        {**RUNNABLE, "COURIER_TARGETS": "[]"},
        [],
        "targets: the worker needs at least one [[targets]] entry",
    ),
    "worker-health-port-is-the-api-port": (
        {
            **RUNNABLE,
            "COURIER_HTTP_PORT": "8080",
            "COURIER_HTTP_HEALTH_PORT": "8078",
            "COURIER_INSTANCE": "2",
            "COURIER_ROLE": "worker",
        },
        [],
        "http.health_port (8080 with instance 2) is the API port: a worker-role process must"
        " not bind the port API processes share",
    ),
}


@pytest.mark.parametrize(("env", "args", "line"), REFUSED.values(), ids=REFUSED.keys())
def test_check_refuses_what_run_refuses(env: dict[str, str], args: list[str], line: str) -> None:
    """Exit 2 and the same one line on stderr from both, before anything starts."""
    for command in ("check", "run"):
        result = courier(command, *args, env=env)
        assert (result.returncode, result.stderr, result.stdout) == (2, f"courier: {line}\n", ""), (
            command
        )


@pytest.mark.parametrize("role", ["all", "api", "worker"])
def test_check_accepts_runnable_settings(role: str) -> None:
    result = courier("check", "--role", role, env=RUNNABLE)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"courier: settings are valid (role={role}, 1 target)\n"


def readme_example(after: str) -> str:
    """The one-line code block that follows ``after`` in the README."""
    words = re.escape(after).replace(r"\ ", r"\s+")  # wherever the paragraph wraps
    found = re.search(words + r"\n\n```\n([^\n]+)\n```\n", README.read_text())
    assert found, f"README has no one-line example after {after!r}"
    return found.group(1)


def test_readme_value_error_example_is_what_courier_prints() -> None:
    line = readme_example("a bad one stops courier with exit code 2 and one line:")
    shown = re.search(r"\((COURIER_\w+)\) = '([^']*)'", line)
    assert shown, line
    result = courier("check", env={**RUNNABLE, shown.group(1): shown.group(2)})
    assert (result.returncode, result.stderr) == (2, f"{line}\n")


def test_readme_role_error_example_is_what_run_and_check_print() -> None:
    line = readme_example("refuses what `run` would, with the same line:")
    for command in ("check", "run"):
        result = courier(command, env={})
        assert (result.returncode, result.stderr) == (2, f"{line}\n"), command


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [env for _, env, _, _ in describe() if f"`{env}`" not in readme]
    assert missing == [], f"README configuration table lacks {missing}"


# --- renamed settings: the new name works, the old one says what it became ------------------


def test_the_secret_cache_switch_is_named_for_what_it_does(tmp_path: Path) -> None:
    assert load().secrets.cache_enabled is True
    assert load({"COURIER_SECRETS_CACHE_ENABLED": "false"}).secrets.cache_enabled is False
    from_toml = load(toml="[secrets]\ncache_enabled = false\n", tmp_path=tmp_path)
    assert from_toml.secrets.cache_enabled is False


@pytest.mark.parametrize(
    ("env", "toml", "message"),
    [
        (
            {},
            "[secrets]\nenabled = false\n",
            "setting secrets.enabled was renamed to secrets.cache_enabled"
            " (COURIER_SECRETS_CACHE_ENABLED)",
        ),
        (
            {"COURIER_SECRETS_ENABLED": "false"},
            None,
            "setting secrets.enabled (COURIER_SECRETS_ENABLED) was renamed to"
            " secrets.cache_enabled (COURIER_SECRETS_CACHE_ENABLED)",
        ),
    ],
)
def test_an_old_setting_name_is_refused_with_its_new_name(
    tmp_path: Path, env: dict[str, str], toml: str | None, message: str
) -> None:
    # Refused, not ignored: an ignored COURIER_SECRETS_ENABLED=false would silently cache again.
    with pytest.raises(SettingsError) as caught:
        load(env, toml, tmp_path)
    assert str(caught.value) == message
