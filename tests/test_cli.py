"""The ``courier`` command as a person runs it: the console script in a subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_settings import RUNNABLE

COURIER = Path(sys.executable).with_name("courier")  # the console script beside the venv's python


def courier(
    *args: str, env: dict[str, str], cwd: Path | None = None, python: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``courier ARGS`` with no settings but ``env`` (no config file, no other COURIER_*)."""
    assert COURIER.exists(), f"{COURIER} is missing: install courier in this venv (make install)"
    return subprocess.run(
        [*(python or []), str(COURIER), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def runnable_toml(tmp_path: Path, name: str = "x.toml") -> Path:
    """A settings file ``check`` accepts, with role=api so its output names where it came from."""
    path = tmp_path / name
    path.write_text(
        'role = "api"\n'
        f'[queue]\nurl = "{RUNNABLE["COURIER_QUEUE_URL"]}"\n'
        f'dlq_url = "{RUNNABLE["COURIER_QUEUE_DLQ_URL"]}"\n'
    )
    return path


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_accepted_before_and_after_the_command(tmp_path: Path, where: str) -> None:
    config = str(runnable_toml(tmp_path))
    args = ["--config", config, "check"] if where == "before" else ["check", "--config", config]
    result = courier(*args, env={})
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "courier: settings are valid (role=api, 0 targets)\n"


def test_config_after_a_nested_command(tmp_path: Path) -> None:
    """``secrets get NAME --config F`` reads F: its invalid value is what courier refuses."""
    config = tmp_path / "bad.toml"
    config.write_text("[http]\nport = 0.5\n")
    result = courier("secrets", "get", "x", "--config", str(config), env={})
    assert result.returncode == 2
    assert result.stderr.startswith("courier: invalid setting http.port"), result.stderr


def test_every_command_accepts_config_after_it() -> None:
    for command in ("run", "local", "check", "token", "replay", "bootstrap"):
        result = courier(command, "--help", env={})
        assert result.returncode == 0, command
        assert "--config" in result.stdout, command


def test_local_toml_in_the_working_directory_is_used_and_announced(tmp_path: Path) -> None:
    (tmp_path / ".courier").mkdir()
    runnable_toml(tmp_path / ".courier", "local.toml")
    result = courier("check", env={}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "courier: settings are valid (role=api, 0 targets)\n"
    assert result.stderr == (
        "courier: using .courier/local.toml (written by courier local);"
        " --config or COURIER_CONFIG choose another\n"
    )


def test_explicit_config_wins_over_local_toml(tmp_path: Path) -> None:
    (tmp_path / ".courier").mkdir()
    (tmp_path / ".courier" / "local.toml").write_text('role = "nonsense"\n')
    explicit = str(runnable_toml(tmp_path))
    for args, env in (
        (["check", "--config", explicit], {}),
        (["check"], {"COURIER_CONFIG": explicit}),
    ):
        result = courier(*args, env=env, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (0, ""), args


BLOCK_MOTO = """
import sys
class _NoMoto:
    def find_spec(self, name, path=None, target=None):
        if name == "moto" or name.startswith("moto."):
            raise ImportError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoMoto())
sys.argv = sys.argv[1:]
from service.cli import main
sys.exit(main())
"""


def test_local_without_moto_names_what_to_install(tmp_path: Path) -> None:
    """The runtime wheel has no moto: one line, exit 2, no traceback."""
    result = courier(
        "local",
        "--aws-port",
        "0",
        "--port",
        "0",
        env={},
        cwd=tmp_path,
        python=[sys.executable, "-c", BLOCK_MOTO],
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "courier: courier local needs moto, a development dependency: pip install 'courier[dev]'\n"
    )


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 another process (this one) listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "env_name", "setting"),
    [
        (
            ["--aws-port", "{port}", "--port", "0"],
            "",
            "courier local --aws-port (0 = any free port)",
        ),
        (
            ["--aws-port", "0", "--port", "0"],
            "COURIER_CONSOLE_PORT",
            "[console] port + instance (COURIER_CONSOLE_PORT; 0 = any free port)",
        ),
        (
            ["--aws-port", "0", "--port", "{port}"],
            "",
            "[http] port (COURIER_HTTP_PORT, or courier local --port; 0 = any free port)",
        ),
    ],
    ids=["aws", "console", "api"],
)
def test_local_with_a_port_in_use_says_which_before_it_starts(
    tmp_path: Path, held_port: int, args: list[str], env_name: str, setting: str
) -> None:
    """One line naming the port and what sets it; no traceback, no hang (moto's would)."""
    env = {env_name: str(held_port)} if env_name else {"COURIER_CONSOLE_PORT": "0"}
    argv = [arg.format(port=held_port) for arg in args]
    result = courier("local", *argv, env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr[-2000:]
    assert result.stderr == (
        f"courier: 127.0.0.1:{held_port} is in use by another process: stop that process,"
        f" or change {setting}\n"
    )
    # Before anything started: no other local's settings file overwritten.
    assert not (tmp_path / ".courier").exists()


def test_bootstrap_creates_resources_and_is_idempotent(moto_endpoint: str, tmp_path: Path) -> None:
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    env = {"COURIER_AWS_ENDPOINT_URL": moto_endpoint}
    runs = [courier("bootstrap", "--prefix", prefix, env=env, cwd=tmp_path) for _ in range(2)]
    for result in runs:
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert runs[0].stdout == runs[1].stdout  # the second run found what the first made
    printed = tomllib.loads(runs[0].stdout)
    assert printed["queue"]["url"].endswith(f"/{prefix}-work")
    assert printed["queue"]["dlq_url"].endswith(f"/{prefix}-dlq")
    assert printed["status"] == {"table": f"{prefix}-status"}
    assert printed["secrets"] == {"table": "credential-store"}
    assert printed["envelope"]["kms_key_id"].startswith("arn:aws:kms:")
    # What it printed is settings courier accepts: check with them, against the same endpoint.
    config = tmp_path / "bootstrapped.toml"
    config.write_text(runs[0].stdout)
    checked = courier("check", "--role", "api", "--config", str(config), env=env)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_bootstrap_demo_secrets_only_with_the_flag(moto_endpoint: str, tmp_path: Path) -> None:
    env = {"COURIER_AWS_ENDPOINT_URL": moto_endpoint, "COURIER_SECRETS_TABLE": "cli-secrets"}
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    plain = courier("bootstrap", "--prefix", prefix, env=env)
    assert plain.returncode == 0, plain.stderr
    missing = courier("secrets", "get", "courier.jwt.hs256", env=env)
    assert missing.returncode == 1, missing.stderr
    for _ in range(2):
        demo = courier("bootstrap", "--prefix", prefix, "--demo-secrets", env=env)
        assert demo.returncode == 0, demo.stderr
    token = courier("token", env=env)
    assert token.returncode == 0, token.stderr
    assert token.stdout.count(".") == 2  # a JWT, signed with the demo key
