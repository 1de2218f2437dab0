"""The image provisioning script, run for real in a fresh Debian 12 root.

What Packer does on an EC2 instance, done here in a chroot: debootstrap a bookworm root
shaped like Debian's cloud image (systemd, python3), copy in the wheelhouse built by
scripts/build-wheelhouse.sh and the systemd/ directory, run packer/scripts/provision.sh
(SKIP_CLOUDWATCH_AGENT=1: no S3 here), run it a second time with no network at all to show
it is idempotent and installs offline, then inspect the result from inside and outside.

Slow (minutes when cold), so marked `provisioning` (`make test-provisioning`). Needs root,
debootstrap, unshare and chroot. The debootstrapped root is cached as a tarball in
build/debootstrap-cache (or $COURIER_DEBOOTSTRAP_CACHE), keyed by suite, mirror and
package list; delete it to start cold. Every command in the root runs in private mount
and PID namespaces, so /proc and /dev mounted for it vanish with it and can never be
left behind under a directory this test deletes.

Then a copy of the provisioned root boots with systemd as PID 1 (systemd-nspawn,
courier_testkit.nspawn; needs systemd-container), gets what EC2 user data gives an instance
(terraform/templates rendered with local endpoints: moto and the kit's stubs on the host) and
is checked as a running machine: one courier per vCPU, READY and /readyz, a request end to
end, journald and the CloudWatch agent's inputs, the watchdog, a stop and a poweroff under
load with nothing lost, and the sandbox refusing nothing courier does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from courier_testkit import nspawn
from courier_testkit.aws import demo_secrets, moto_process
from courier_testkit.ports import free_port
from courier_testkit.stubs import StubProcess, stub_process
from courier_testkit.tokens import mint_token
from service.aws import open_clients
from service.bootstrap import ResourceNames, Resources, bootstrap
from service.local import use_fake_credentials
from service.settings import AwsSettings, load_settings
from tests.test_terraform import _render as render_template

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# What Debian's bookworm cloud image has that minbase lacks and courier needs.
BASE_PACKAGES = ("systemd", "systemd-sysv", "python3", "ca-certificates", "util-linux")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT_ENV = ("COURIER_INSTANCE=1", "COURIER_HTTP_METRICS_PORT=9100", "COURIER_EC2_ENABLED=on")

pytestmark = [
    pytest.mark.provisioning,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, chroot)"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("debootstrap", "unshare", "chroot")),
        reason="needs debootstrap (Debian package: debootstrap), unshare and chroot",
    ),
]


def debian_mirror() -> str:
    """The Debian mirror the host's apt uses (deb822 or one-line sources), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        for block in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:(.*)$", block, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and SUITE in parts:
                return next(p for p in parts[1:] if "://" in p)
    return "http://deb.debian.org/debian"


# --- running things inside the root -------------------------------------------------------

_ENTER = r"""
set -eu
mount -t proc proc "$ROOT/proc"
mount -t tmpfs -o mode=0755,size=16m devtmp "$ROOT/dev"
node() { mknod -m 0666 "$ROOT/dev/$1" c "$2" "$3"; }
node null 1 3; node zero 1 5; node full 1 7; node random 1 8; node urandom 1 9; node tty 5 0
ln -s /proc/self/fd "$ROOT/dev/fd"
mkdir "$ROOT/dev/pts" "$ROOT/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$ROOT/dev/pts"
ln -s pts/ptmx "$ROOT/dev/ptmx"
exec chroot "$ROOT" /usr/bin/env -i "PATH=$CHROOT_PATH" HOME=/root LANG=C.UTF-8 $CHROOT_ENV "$@"
"""


def in_root(
    root: Path,
    *command: str,
    env: dict[str, str] | None = None,
    network: bool = True,
    check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run a command chrooted in ``root``, in private mount/PID (and maybe net) namespaces."""
    namespaces = ["--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    if not network:
        namespaces.append("--net")
    # Values must not contain spaces (they are word-split into env's arguments).
    extra = " ".join(f"{key}={value}" for key, value in (env or {}).items())
    result = subprocess.run(
        ["unshare", *namespaces, "sh", "-c", _ENTER, "enter", *command],
        env={
            "PATH": os.environ.get("PATH", CHROOT_PATH),
            "ROOT": str(root),
            "CHROOT_PATH": CHROOT_PATH,
            "CHROOT_ENV": extra,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode} in {root}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


# --- the base root: debootstrap once, then a cached tarball --------------------------------


def base_tarball() -> Path:
    mirror = debian_mirror()
    cache = Path(os.environ.get("COURIER_DEBOOTSTRAP_CACHE", REPO / "build" / "debootstrap-cache"))
    key = hashlib.sha256(f"{SUITE} {mirror} {' '.join(BASE_PACKAGES)}".encode()).hexdigest()[:12]
    tarball = cache / f"{SUITE}-minbase-{key}.tar"
    if tarball.exists():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="debootstrap-") as scratch:
        target = Path(scratch) / "root"
        # In a private mount namespace: whatever debootstrap mounts dies with it.
        subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
             f"--include={','.join(BASE_PACKAGES)}", "--components=main", SUITE, str(target),
             mirror],
            check=True, capture_output=True, timeout=1500,
        )  # fmt: skip
        partial = tarball.with_suffix(".partial")
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(target), "-cf", str(partial), "."],
            check=True,
            timeout=300,
        )
        partial.rename(tarball)
    return tarball


def assert_nothing_mounted_under(path: Path) -> None:
    mounts = Path("/proc/self/mountinfo").read_text().split("\n")
    inside = [m for m in mounts if f" {path}/" in m or f" {path} " in m]
    assert not inside, f"mounts left under {path}: {inside}"


# --- one provisioned root for the whole module ----------------------------------------------


@dataclass
class Provisioned:
    root: Path
    timings: dict[str, float] = field(default_factory=dict)
    first_run: str = ""
    second_run: str = ""

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")


def tree_manifest(root: Path, *tops: str) -> dict[str, tuple[int, int, int, str]]:
    """path -> (mode, uid, gid, link target) for everything under the given directories."""
    manifest: dict[str, tuple[int, int, int, str]] = {}
    for top in tops:
        base = root / top.lstrip("/")
        for path in [base, *base.rglob("*")] if base.exists() else []:
            if "__pycache__" in path.parts:
                continue
            st = path.lstat()
            link = os.readlink(path) if path.is_symlink() else ""
            manifest[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, link)
    return manifest


IDEMPOTENT_TREES = ("/opt/courier", "/etc/courier", "/etc/systemd/system",
                    "/usr/lib/systemd/system-generators", "/opt/aws", "/etc/logrotate.d")  # fmt: skip


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    timings: dict[str, float] = {}
    work = tmp_path_factory.mktemp("provisioning")

    started = time.monotonic()
    wheelhouse = work / "wheelhouse"
    subprocess.run(
        [str(REPO / "scripts" / "build-wheelhouse.sh"), str(wheelhouse)],
        check=True, capture_output=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    timings["wheelhouse"] = time.monotonic() - started

    started = time.monotonic()
    tarball = base_tarball()
    timings["base root (debootstrap or cache)"] = time.monotonic() - started

    started = time.monotonic()
    root = work / "root"
    root.mkdir()
    subprocess.run(
        ["tar", "--numeric-owner", "-C", str(root), "-xf", str(tarball)], check=True, timeout=300
    )
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    image = root / "tmp" / "courier-image"
    shutil.copytree(wheelhouse, image / "wheelhouse")
    shutil.copytree(REPO / "systemd", image / "systemd")
    shutil.copy2(REPO / "packer" / "files" / "cloudwatch-agent.json", image / "cw.json")
    shutil.copy2(REPO / "packer" / "files" / "prometheus.yaml", image / "prometheus.yaml")
    shutil.copy2(REPO / "packer" / "scripts" / "provision.sh", image / "provision.sh")
    timings["unpack"] = time.monotonic() - started

    env = {
        "WHEELHOUSE": "/tmp/courier-image/wheelhouse",
        "SYSTEMD_SRC": "/tmp/courier-image/systemd",
        "CW_CONFIG": "/tmp/courier-image/cw.json",
        "CW_PROMETHEUS_CONFIG": "/tmp/courier-image/prometheus.yaml",
        "SKIP_CLOUDWATCH_AGENT": "1",
    }
    result = Provisioned(root=root, timings=timings)
    try:
        started = time.monotonic()
        first = in_root(root, "bash", "/tmp/courier-image/provision.sh", env=env)
        timings["provision.sh"] = time.monotonic() - started
        result.first_run = first.stdout + first.stderr
        before = tree_manifest(root, *IDEMPOTENT_TREES)

        # Again, with no network at all: nothing left to install from apt, and the venv
        # comes from the wheelhouse alone.
        started = time.monotonic()
        second = in_root(root, "bash", "/tmp/courier-image/provision.sh", env=env, network=False)
        timings["provision.sh again, offline"] = time.monotonic() - started
        result.second_run = second.stdout + second.stderr
        assert tree_manifest(root, *IDEMPOTENT_TREES) == before

        print(result.first_run + result.second_run)
        print("\nprovisioning timings: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
        yield result
    finally:
        assert_nothing_mounted_under(root)
        shutil.rmtree(work, ignore_errors=True)


# --- what the image contains ----------------------------------------------------------------


def test_courier_runs_from_the_venv(provisioned: Provisioned) -> None:
    out = in_root(provisioned.root, "/opt/courier/venv/bin/courier", "--version").stdout
    assert out.strip() == f"courier {VERSION}"
    assert "provision: installing" in provisioned.first_run  # python3-venv, logrotate
    assert "provision: installing" not in provisioned.second_run  # nothing left for apt


def test_courier_check_passes_as_the_service_user(provisioned: Provisioned) -> None:
    """The service user can read /etc/courier, and the unit's environment is valid."""
    config = provisioned.path("/etc/courier/courier.toml")
    # A queue pair and a target too: check refuses what `courier run` would refuse.
    config.write_text(
        '[http]\nhost = "0.0.0.0"\nport = 8080\n'
        '[queue]\nurl = "https://sqs.eu-west-1.amazonaws.com/123456789012/courier"\n'
        'dlq_url = "https://sqs.eu-west-1.amazonaws.com/123456789012/courier-dlq"\n'
        '[[targets]]\nname = "crm"\nurl = "https://crm.internal/api"\n'
    )
    gid = group_entry(provisioned, "courier")[2]
    os.chown(config, 0, gid)
    config.chmod(0o640)
    try:
        out = in_root(
            provisioned.root,
            "setpriv", "--reuid=courier", "--regid=courier", "--init-groups",
            "/opt/courier/venv/bin/courier", "check",
            env=dict(item.split("=", 1) for item in UNIT_ENV),
        )  # fmt: skip
        assert "settings are valid" in out.stdout + out.stderr
    finally:
        config.unlink()


def passwd_entry(provisioned: Provisioned, name: str) -> list[str]:
    for line in provisioned.path("/etc/passwd").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":")
    raise AssertionError(f"no user {name}")


def group_entry(provisioned: Provisioned, name: str) -> tuple[str, str, int]:
    for line in provisioned.path("/etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields[0], fields[1], int(fields[2])
    raise AssertionError(f"no group {name}")


def test_service_user(provisioned: Provisioned) -> None:
    name, _, uid, gid, _, home, shell = passwd_entry(provisioned, "courier")
    assert int(uid) < 1000  # a system account
    assert int(gid) == group_entry(provisioned, "courier")[2]
    assert shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert home == "/nonexistent"
    assert not provisioned.path("/nonexistent").exists()
    shadow = next(
        line for line in provisioned.path("/etc/shadow").read_text().splitlines()
        if line.startswith(f"{name}:")
    )  # fmt: skip
    assert shadow.split(":")[1].startswith("!")  # locked


def test_units_and_generator_installed(provisioned: Provisioned) -> None:
    for unit in ("courier@.service", "courier.target", "courier-journal-export.service"):
        installed = provisioned.path(f"/usr/lib/systemd/system/{unit}")
        assert installed.read_bytes() == (REPO / "systemd" / unit).read_bytes()
        assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    generator = provisioned.path("/usr/lib/systemd/system-generators/courier-generator")
    assert stat.S_IMODE(generator.stat().st_mode) == 0o755
    assert generator.stat().st_uid == 0


def test_courier_target_enabled(provisioned: Provisioned) -> None:
    wants = provisioned.path("/etc/systemd/system/multi-user.target.wants")
    for unit in ("courier.target", "courier-journal-export.service"):
        link = wants / unit
        assert link.is_symlink(), f"{unit} is not enabled"
        assert os.readlink(link).endswith(f"/systemd/system/{unit}")


def test_generator_runs_in_the_image(provisioned: Provisioned) -> None:
    in_root(
        provisioned.root, "/usr/lib/systemd/system-generators/courier-generator",
        "/tmp/gen", "/tmp/gen-early", "/tmp/gen-late", env={"COURIER_NPROC": "4"},
    )  # fmt: skip
    wants = provisioned.path("/tmp/gen/courier.target.wants")
    assert sorted(p.name for p in wants.iterdir()) == [f"courier@{i}.service" for i in range(1, 5)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_installed_units_verify_clean(provisioned: Provisioned) -> None:
    """Against the image's own unit tree and the real /opt/courier/venv/bin/courier."""
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={provisioned.root}", "courier@1.service",
         "courier.target", "courier-journal-export.service"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--root={provisioned.root}",
         "--threshold=20", "courier@1.service"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert security.returncode == 0, security.stdout


def test_venv_is_root_owned_and_read_only(provisioned: Provisioned) -> None:
    for path in [provisioned.path("/opt/courier"), *provisioned.path("/opt/courier").rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
        if not stat.S_ISLNK(st.st_mode):
            assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    # And from the service user's point of view.
    writable = in_root(
        provisioned.root, "setpriv", "--reuid=courier", "--regid=courier", "--init-groups",
        "find", "/opt/courier", "/etc/courier", "-writable",
    )  # fmt: skip
    assert writable.stdout == ""


def test_config_directory_permissions(provisioned: Provisioned) -> None:
    gid = group_entry(provisioned, "courier")[2]
    config = provisioned.path("/etc/courier").stat()
    assert (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid) == (0o750, 0, gid)
    example = provisioned.path("/etc/courier/courier.env.example").stat()
    assert (stat.S_IMODE(example.st_mode), example.st_uid, example.st_gid) == (0o640, 0, gid)


def test_log_shipping_configuration(provisioned: Provisioned) -> None:
    agent = provisioned.path("/opt/aws/amazon-cloudwatch-agent/etc/courier-agent.json")
    assert json.loads(agent.read_text()) == json.loads(
        (REPO / "packer" / "files" / "cloudwatch-agent.json").read_text()
    )
    assert provisioned.path(
        "/opt/aws/amazon-cloudwatch-agent/etc/courier-prometheus.yaml"
    ).is_file()
    # logrotate accepts the rotation rule (-d: check only).
    in_root(provisioned.root, "logrotate", "-d", "/etc/logrotate.d/courier-journal-export")


# --- the image booted under systemd ---------------------------------------------------------
# The provisioned root (a copy of it), booted with systemd as PID 1 by systemd-nspawn
# (courier_testkit.nspawn), given what an EC2 instance gets: the user data rendered from
# terraform/templates, run as root after boot. AWS is moto on the host, the IdM and the
# legacy systems are the kit's stubs on the host; the machine shares the host's network.
#
# What EC2 has and this does not, so the image is told (in /etc/courier/courier.env, the
# operator's override file) where to find the stand-ins instead:
# - AWS endpoints: COURIER_AWS_ENDPOINT_URL is moto on 127.0.0.1 (courier then signs with fake
#   credentials by itself, service/cli.py);
# - IMDS: COURIER_EC2_IMDS_URL is a closed port, so ec2.enabled = "on" (the template's) meets
#   "IMDS unreachable" at once; on a CI runner that is itself an EC2 instance,
#   169.254.169.254 would be the runner's own;
# - ports: the machine's ports are the host's, so the API and metrics ports are free ones
#   (COURIER_HTTP_METRICS_PORT must be set there: the unit's Environment= beats the TOML).

REGION = "us-east-1"
TARGETS = (("crm", "json", "courier.crm.token"), ("billing", "soap", ""))
# Deliveries take this long, so that a stop or a poweroff under load finds messages in flight.
TARGET_LATENCY_SECONDS = 0.3
READY_TIMEOUT_SECONDS = 90.0


@dataclass
class Image:
    """The booted image, what it was given, and the stand-ins it talks to."""

    machine: nspawn.Machine
    api: str  # http://127.0.0.1:<api port>
    metrics_base: int
    nproc: int
    token: str
    stubs: StubProcess
    config_path: Path  # the rendered courier.toml, on the host
    agent_config: dict[str, Any]  # cloudwatch-agent.json.tftpl rendered
    before_user_data: dict[str, str]  # courier@1 before /etc/courier/courier.toml existed
    user_data_output: str

    def instances(self) -> list[str]:
        return [f"courier@{n}.service" for n in range(1, self.nproc + 1)]


def free_port_run(count: int) -> int:
    """A port p such that p + 1 .. p + count are free now (courier@N's metrics ports)."""
    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for n in range(1, count + 1):
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("0.0.0.0", base + n))
        except OSError:
            continue
        return base
    raise AssertionError(f"no {count} consecutive free ports")


def template_values(
    resources: Resources, stubs: StubProcess, api_port: int, metrics_base: int
) -> dict[str, Any]:
    """terraform/compute.tf's inputs to courier.toml.tftpl, pointing at the local stand-ins."""
    return {
        "role": "all",
        "api_port": api_port,
        "drain_seconds": 20,
        "log_level": "INFO",
        "region": REGION,
        "queue_url": resources.queue_url,
        "dlq_url": resources.dlq_url,
        "status_table": resources.status_table,
        "secrets_table": resources.secrets_table,
        "secrets_ttl_seconds": 300,
        "kms_key_id": resources.data_key_arn,
        "jwt_issuer": "https://login.example.net/",
        "jwt_audience": "courier",
        "jwks_url": "",
        "jwt_hs256_secret": "courier.jwt.hs256",
        "idm_url": stubs.urls["idm"],
        "idm_api_key_secret": "courier.idm.api_key",
        "max_in_flight": 100,
        "targets": [
            {
                "name": name,
                "url": f"{stubs.urls[name]}/{name}",
                "format": fmt,
                "secret": secret,
                "timeout_seconds": 5,
                "concurrency": 32,
            }
            for name, fmt, secret in TARGETS
        ],
        "metrics_base_port": metrics_base,
        "asg_name": "courier",
        "lifecycle_hook_name": "courier-drain",
        "secrets_encryption_context": {},
        "secrets_kms_key_id": resources.credstash_key_arn,
        "accepted_key_ids": [],
    }


def render_user_data(work: Path, values: dict[str, Any]) -> tuple[str, str]:
    """(user data script, agent configuration) as terraform/compute.tf renders them."""
    config = render_template("courier.toml.tftpl", values, work)
    agent = render_template(
        "cloudwatch-agent.json.tftpl",
        {"log_group_name": "/courier/courier", "metrics_namespace": "Courier"},
        work,
    )
    user_data = render_template(
        "user_data.sh.tftpl",
        {
            "courier_config": config,
            "cloudwatch_agent_config": agent,
            "metrics_base_port": values["metrics_base_port"],
            "region": REGION,
        },
        work,
    )
    (work / "courier.toml").write_text(config)
    return user_data, agent


def write_stand_ins(machine: nspawn.Machine, aws_endpoint: str, metrics_base: int) -> None:
    """/etc/courier/courier.env: where this machine finds what EC2 would give it."""
    env = machine.path("/etc/courier/courier.env")
    env.write_text(
        "# tests/test_provisioning.py: stand-ins for what EC2 gives an instance.\n"
        f"COURIER_AWS_ENDPOINT_URL={aws_endpoint}\n"
        f"COURIER_EC2_IMDS_URL=http://127.0.0.1:{free_port()}\n"
        f"COURIER_HTTP_METRICS_PORT={metrics_base}\n"
    )
    machine.run("chown", "root:courier", "/etc/courier/courier.env")
    machine.run("chmod", "0640", "/etc/courier/courier.env")


def wait_all_ready(machine: nspawn.Machine, units: Sequence[str]) -> dict[str, dict[str, str]]:
    """Every unit active with a ``ready`` STATUS= (READY=1 sent); their properties."""

    def ready() -> dict[str, dict[str, str]] | None:
        shown = {u: machine.show(u, *UNIT_PROPERTIES) for u in units}
        if all(
            s["ActiveState"] == "active" and s["StatusText"].startswith("ready")
            for s in shown.values()
        ):
            return shown
        return None

    return nspawn.wait_for(ready, timeout=READY_TIMEOUT_SECONDS, what=f"{', '.join(units)} ready")


UNIT_PROPERTIES = (
    "ActiveState",
    "SubState",
    "StatusText",
    "MainPID",
    "NRestarts",
    "Result",
    "ConditionResult",
    "ExecMainStatus",
    "TimeoutStopUSec",
    "WatchdogUSec",
)


@pytest.fixture(scope="module")
async def image(
    provisioned: Provisioned, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Image]:
    reason = nspawn.missing_tools()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("image")
    try:
        async with booted_image(provisioned, work) as built:
            yield built
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.asynccontextmanager
async def booted_image(provisioned: Provisioned, work: Path) -> AsyncIterator[Image]:
    """A copy of the provisioned root, booted, given its user data, every courier@N ready."""
    root = work / "root"
    subprocess.run(
        ["cp", "-a", "--reflink=auto", str(provisioned.root), str(root)], check=True, timeout=300
    )
    use_fake_credentials()
    secrets = {**demo_secrets(), "courier.crm.token": "crm-token"}
    cgroups_before = nspawn.top_cgroups()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lambda: assert_no_new_cgroups(cgroups_before))
        moto = await stack.enter_async_context(moto_process())
        clients = await stack.enter_async_context(
            open_clients(AwsSettings(region=REGION, endpoint_url=moto.url))
        )
        resources = await bootstrap(clients, ResourceNames(prefix="image"), secrets)
        stubs = await stack.enter_async_context(
            stub_process(
                {name: TARGET_LATENCY_SECONDS for name, _, _ in TARGETS},
                idm_api_key=secrets["courier.idm.api_key"],
            )
        )
        nproc = len(os.sched_getaffinity(0))
        api_port, metrics_base = free_port(), free_port_run(nproc)
        values = template_values(resources, stubs, api_port, metrics_base)
        user_data, agent = render_user_data(work, values)
        machine = stack.enter_context(nspawn.booted(root))
        before = machine.show("courier@1.service", *UNIT_PROPERTIES)
        write_stand_ins(machine, moto.url, metrics_base)
        machine.path("/root/user-data.sh").write_text(user_data)
        ran = machine.run("bash", "/root/user-data.sh", timeout=180)
        auth = load_settings(work / "courier.toml", environ={}).auth
        built = Image(
            machine=machine,
            api=f"http://127.0.0.1:{api_port}",
            metrics_base=metrics_base,
            nproc=int(machine.run("nproc").stdout),
            token=mint_token(secrets["courier.jwt.hs256"], auth),
            stubs=stubs,
            config_path=work / "courier.toml",
            agent_config=json.loads(agent),
            before_user_data=before,
            user_data_output=ran.stdout + ran.stderr,
        )
        wait_all_ready(machine, built.instances())
        yield built


def assert_no_new_cgroups(before: set[Path]) -> None:
    """The boots left no cgroup behind in the host's cgroup roots (nspawn's payload/ ...)."""
    left = {
        p
        for p in nspawn.top_cgroups() - before
        if p.name.startswith(("payload", "supervisor", "courier-nspawn-"))
    }
    assert not left, f"cgroups left behind: {sorted(left)}"


# --- talking to the booted image from the host ------------------------------------------------


def mailbox(username: str) -> dict[str, str]:
    return {
        "username": username,
        "display_name": username.title(),
        "plan": "standard",
        "contact_email": f"{username}@example.com",
    }


async def statuses(image: Image, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """GET /v1/requests/{id} of each request: id -> the status document."""
    headers = {"Authorization": f"Bearer {image.token}"}
    found: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for request_id in request_ids:
            async with session.get(f"{image.api}/v1/requests/{request_id}", headers=headers) as r:
                assert r.status == 200, (request_id, r.status, await r.text())
                found[request_id] = await r.json()
    return found


async def wait_completed(
    image: Image, request_ids: Sequence[str], timeout: float = 180
) -> dict[str, dict[str, Any]]:
    """Poll until every request is ``completed``; their final documents (fails naming the rest)."""
    pending, done = set(request_ids), {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for request_id, document in (await statuses(image, sorted(pending))).items():
            if document["status"] == "completed":
                done[request_id] = document
                pending.discard(request_id)
        await asyncio.sleep(1)
    left = await statuses(image, sorted(pending)) if pending else {}
    assert not pending, f"{len(pending)} accepted requests not completed: " + json.dumps(
        {k: v["status"] for k, v in list(left.items())[:10]}
    )
    return done


@dataclass
class Load:
    """What the load generator saw. A client error is any request that got neither 202 nor
    503 with Retry-After: a 5xx or 4xx, a connection cut after it was established (reset, EOF)
    or a timeout. A connection refused before anything was sent (ECONNREFUSED: no listener,
    the last instance gone) is counted apart: the request never reached courier, and a load
    balancer has already stopped routing to an instance that is not ready."""

    accepted: dict[str, str] = field(default_factory=dict)  # request id -> username
    retry_later: int = 0  # 503 + Retry-After
    refused_connect: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.accepted)} accepted, {self.retry_later} 503+Retry-After, "
            f"{self.refused_connect} connect refused, {len(self.errors)} errors"
        )


async def generate_load(image: Image, stop: asyncio.Event, load: Load, clients: int = 4) -> None:
    """POST /v1/mailboxes from ``clients`` loops, one new connection per request, until ``stop``."""
    headers = {"Authorization": f"Bearer {image.token}"}
    connector = aiohttp.TCPConnector(force_close=True, limit=clients)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def client(number: int) -> None:
            sent = 0
            while not stop.is_set():
                sent += 1
                username = f"load-{number}-{sent}-{os.urandom(3).hex()}"
                await post_one(session, image.api, headers, username, load)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(client(n) for n in range(clients)))


async def post_one(
    session: aiohttp.ClientSession, api: str, headers: dict[str, str], username: str, load: Load
) -> None:
    try:
        async with session.post(
            f"{api}/v1/mailboxes", json=mailbox(username), headers=headers
        ) as r:
            body = await r.text()
            if r.status == 202:
                load.accepted[json.loads(body)["request_id"]] = username
            elif r.status == 503 and r.headers.get("Retry-After"):
                load.retry_later += 1
            else:
                load.errors.append(f"HTTP {r.status}: {body[:200]}")
    except aiohttp.ClientConnectorError as exc:
        if exc.os_error.errno == errno.ECONNREFUSED:
            load.refused_connect += 1
            await asyncio.sleep(0.05)
        else:
            load.errors.append(f"connect: {exc!r}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        load.errors.append(repr(exc))


async def under_load(
    image: Image, action: Callable[[], Any], warm_seconds: float = 2.0
) -> tuple[Load, Any]:
    """Run ``action`` (blocking, in a thread) while the load generator runs; stop it after."""
    load, stop = Load(), asyncio.Event()
    generator = asyncio.create_task(generate_load(image, stop, load))
    await asyncio.sleep(warm_seconds)
    assert load.accepted, f"no request accepted before the action: {load.summary()}"
    try:
        result = await asyncio.to_thread(action)
    finally:
        stop.set()
        await generator
    return load, result


async def assert_delivered(image: Image, usernames: Iterable[str]) -> None:
    """Every username reached every target, each by exactly one request (no duplicate effect)."""
    wanted = set(usernames)
    for name, _, _ in TARGETS:
        requests = (await image.stubs.effects(name))["requests"]
        missing = wanted - set(requests)
        assert not missing, f"{name} never got {len(missing)} of them: {sorted(missing)[:5]}"
        twice = {u: ids for u, ids in requests.items() if u in wanted and len(set(ids)) > 1}
        assert not twice, f"{name} got these from two requests: {twice}"


# --- what the booted image does ---------------------------------------------------------------


def test_image_boots_and_waits_for_its_settings(image: Image) -> None:
    """systemd reaches "running" with nothing failed; before user data wrote the settings,
    courier@N was skipped by its condition, not failed into its start limit."""
    assert image.machine.state() == "running", image.machine.systemctl("--failed", check=False)
    before = image.before_user_data
    assert (before["ActiveState"], before["ConditionResult"], before["Result"]) == (
        "inactive",
        "no",
        "success",
    ), before
    assert "courier.target restarted" in image.user_data_output, image.user_data_output


def test_one_courier_per_vcpu_and_the_target_active(image: Image) -> None:
    listed = image.machine.systemctl("list-units", "--all", "--plain", "--no-legend", "courier@*")
    units = sorted(line.split()[0] for line in listed.splitlines())
    assert units == sorted(image.instances()), listed
    assert image.nproc >= 1
    for unit in units:
        assert image.machine.show(unit, "ActiveState", "SubState") == {
            "ActiveState": "active",
            "SubState": "running",
        }
    assert image.machine.show("courier.target", "ActiveState")["ActiveState"] == "active"


async def test_every_instance_sent_ready_and_readyz_answers(image: Image) -> None:
    port = urlsplit(image.api).port
    for n, unit in enumerate(image.instances(), start=1):
        shown = image.machine.show(unit, "StatusText", "ActiveState")
        # STATUS= follows READY=1 (service/daemon.py): the unit's own word that it is ready.
        assert shown["StatusText"].startswith(f"ready: API on http://0.0.0.0:{port}"), shown
        metrics = await fetch_metrics(image, n)
        assert metrics["courier_ready"] == [1.0], (
            f"{unit}: courier_ready {metrics['courier_ready']}"
        )
    # Every instance shares the API port (SO_REUSEPORT): each new connection may reach either.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(10 * image.nproc):
            async with session.get(f"{image.api}/readyz") as r:
                assert (r.status, (await r.json())["status"]) == (200, "ready")


async def fetch_metrics(image: Image, instance: int) -> dict[str, list[float]]:
    """courier@N's /metrics (on metrics base + N): sample name -> values."""
    url = f"http://127.0.0.1:{image.metrics_base + instance}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert r.status == 200, url
        text = await r.text()
    samples: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.value)
        declared = {"counter": ["_total"], "histogram": ["_sum", "_count", "_bucket"]}
        for suffix in declared.get(family.type, [""]):
            samples.setdefault(family.name + suffix, [])
    return samples


async def test_create_mailbox_through_the_image_completes(image: Image) -> None:
    username = f"boot-{os.urandom(4).hex()}"
    headers = {"Authorization": f"Bearer {image.token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{image.api}/v1/mailboxes", json=mailbox(username), headers=headers) as r,
    ):
        assert r.status == 202, await r.text()
        accepted = await r.json()
        assert r.headers["Location"] == f"/v1/requests/{accepted['request_id']}"
    done = await wait_completed(image, [accepted["request_id"]], timeout=60)
    document = done[accepted["request_id"]]
    assert document["targets"] == {name: "delivered" for name, _, _ in TARGETS}, document
    assert document["identity_id"], document  # the IdM stub made the identity
    await assert_delivered(image, [username])


def courier_lines(machine: nspawn.Machine, unit: str = "courier@*") -> list[dict[str, Any]]:
    """courier's own journal lines (SyslogIdentifier=courier), each parsed as JSON."""
    text = machine.journal("--unit", unit, "--identifier=courier", "--output=cat")
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, f"no courier lines in the journal for {unit}"
    parsed = []
    for line in lines:
        entry = json.loads(line)  # a line that is not JSON fails here, quoting it
        assert {"ts", "level", "logger", "message"} <= entry.keys(), line
        parsed.append(entry)
    return parsed


def test_journald_holds_courier_json_lines(image: Image) -> None:
    for unit in image.instances():
        events = [entry.get("event") for entry in courier_lines(image.machine, unit)]
        assert "listening" in events, (unit, events)
        assert "ready" in events, (unit, events)
    # ec2.enabled is "on" (the template's) and IMDS is absent: said once, and nothing else.
    first = courier_lines(image.machine, "courier@1.service")
    assert any(entry.get("event") == "imds_unavailable" for entry in first)


async def test_cloudwatch_agent_config_names_what_exists(image: Image) -> None:
    """Both agent configurations, the AMI's (packer/files, installed by provision.sh) and the
    one Terraform's user data installs, name log files and metrics the booted image has."""
    installed = json.loads(
        image.machine.path("/opt/aws/amazon-cloudwatch-agent/etc/courier-agent.json").read_text()
    )
    names: set[str] = set()
    for n in range(1, image.nproc + 1):
        names |= set(await fetch_metrics(image, n))
    for config in (installed, image.agent_config):
        for item in config["logs"]["logs_collected"]["files"]["collect_list"]:
            path = image.machine.path(item["file_path"])
            # The file the exporter appends to exists; under nspawn it stays empty (the
            # exporter's sandboxed /proc shows the host's boot id, not the machine's, so
            # journalctl --follow matches nothing), so its content is not checked here.
            assert path.is_file(), item["file_path"]
        prometheus = config["logs"]["metrics_collected"]["prometheus"]
        assert image.machine.path(prometheus["prometheus_config_path"]).is_file()
        for declaration in prometheus["emf_processor"]["metric_declaration"]:
            for selector in declaration["metric_selectors"]:
                assert any(re.search(selector, name) for name in names), (
                    f"{selector}: no such metric in the image's /metrics"
                )
    # The AMI's scrape list covers every instance at the port the unit gives it (9100 + N).
    scrape = image.machine.path("/opt/aws/amazon-cloudwatch-agent/etc/courier-prometheus.yaml")
    unit = (REPO / "systemd" / "courier@.service").read_text()
    unit_base = int(re.findall(r"COURIER_HTTP_METRICS_PORT=(\d+)", unit)[0])
    for n in range(1, image.nproc + 1):
        assert f"localhost:{unit_base + n}" in scrape.read_text()


# What the sandbox would leave in the journal if it broke something: an EPERM from
# SystemCallFilter=/SystemCallErrorNumber=, a denied path, a killed process.
SANDBOX_REFUSALS = re.compile(
    r"EPERM|Operation not permitted|Permission denied|Read-only file system|PermissionError"
    r"|seccomp|SIGSYS|status=31/SYS|core-dump|dumped core",
    re.IGNORECASE,
)


async def test_sandbox_breaks_nothing_courier_does(image: Image) -> None:
    """Under courier@.service's sandbox, courier listens and connects (the other tests), reads
    /proc (prometheus_client's process_* metrics), runs uvloop, and nothing is refused."""
    for n, unit in enumerate(image.instances(), start=1):
        pid = image.machine.host_pid(int(image.machine.show(unit, "MainPID")["MainPID"]))
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert re.search(r"/uvloop/loop\.cpython-[^/]*\.so", maps), f"{unit}: uvloop not loaded"
        metrics = await fetch_metrics(image, n)
        for name in (
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ):
            assert metrics.get(name), f"{unit}: {name} missing (/proc unreadable?)"
    journal = image.machine.journal("--unit=courier@*", "--output=cat")
    refused = [line for line in journal.splitlines() if SANDBOX_REFUSALS.search(line)]
    assert not refused, refused


def test_journal_export_runs_and_selects_only_courier_json_lines(image: Image) -> None:
    """courier-journal-export.service stays up under its sandbox (it restarted every 2 s with
    ProcSubset=pid: "Failed to get boot id"), and the journal match of its ExecStart selects
    courier's JSON lines and nothing else (--unit='courier@*.service' also took systemd's
    "Started courier@1.service" lines, and resolved the glob only once, at its start).

    The file it fills stays empty here: nspawn gives the machine a boot id of its own, while
    the exporter's sandbox mounts a fresh /proc that shows the kernel's, and journalctl
    --follow keeps only entries of the boot id it sees. On EC2 both are the kernel's.
    """
    machine, export = image.machine, "courier-journal-export.service"
    shown = machine.show(export, "ActiveState", "SubState", "NRestarts")
    assert shown == {"ActiveState": "active", "SubState": "running", "NRestarts": "0"}, (
        shown, machine.journal("--unit", export)[-3000:]
    )  # fmt: skip
    assert machine.path("/var/log/courier/courier.log").is_file()
    unit = (REPO / "systemd" / export).read_text()
    command = re.findall(r"^ExecStart=/bin/sh -c 'exec (journalctl .*?) >>", unit, re.M)[0]
    selecting = [arg for arg in command.split()[1:] if arg not in ("--follow",)]
    selecting = [arg for arg in selecting if not arg.startswith("--cursor-file")]
    lines = machine.run("journalctl", "--no-pager", *selecting).stdout.splitlines()
    events = {json.loads(line).get("event") for line in lines if line.strip()}
    assert {"listening", "ready", "http_request"} <= events, events


async def test_watchdog_kills_a_blocked_instance_and_restarts_it(image: Image) -> None:
    """SIGSTOP freezes courier@1's event loop, so its WATCHDOG=1 pings stop: systemd kills it
    with its WatchdogSignal once WatchdogSec (30 s) has passed without one, and
    Restart=on-failure brings it back, ready (about 31 s in all here)."""
    machine, unit = image.machine, "courier@1.service"
    before = machine.show(unit, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "30s", before
    os.kill(machine.host_pid(int(before["MainPID"])), signal.SIGSTOP)

    def restarted() -> dict[str, str] | None:
        now = machine.show(unit, *UNIT_PROPERTIES)
        fresh = now["MainPID"] not in ("0", before["MainPID"])
        return now if fresh and now["StatusText"].startswith("ready") else None

    after = await asyncio.to_thread(
        nspawn.wait_for, restarted, timeout=150, what=f"{unit} restarted after its watchdog", poll=1
    )
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, after
    log = machine.journal("--unit", unit, "--output=cat")
    assert "Watchdog timeout" in log, log[-2000:]
    assert f"{unit}: Failed with result 'watchdog'" in log, log[-2000:]
    async with aiohttp.ClientSession() as session, session.get(f"{image.api}/readyz") as r:
        assert r.status == 200


def instances_down(
    machine: nspawn.Machine, units: Sequence[str]
) -> dict[str, dict[str, str]] | None:
    shown = {u: machine.show(u, *UNIT_PROPERTIES) for u in units}
    return (
        shown if all(s["ActiveState"] in ("inactive", "failed") for s in shown.values()) else None
    )


async def test_stop_under_load_drains_in_time_and_loses_nothing(image: Image) -> None:
    """`systemctl stop courier.target` while clients keep posting: every instance exits by
    itself (Result=success, status 0) within TimeoutStopSec, clients only ever get 202 or
    503 + Retry-After, and every accepted request completes once courier.target is started
    again."""
    machine, units = image.machine, image.instances()
    timeout_stop = machine.show(units[0], "TimeoutStopUSec")["TimeoutStopUSec"]
    assert timeout_stop == "30s"

    def stop() -> float:
        started = time.monotonic()
        machine.systemctl("stop", "courier.target", timeout=120)
        nspawn.wait_for(lambda: instances_down(machine, units), timeout=120, what="instances down")
        return time.monotonic() - started

    load, took = await under_load(image, stop)
    print(f"stop under load: {took:.1f}s; {load.summary()}")
    assert took < 30, f"stop took {took:.1f}s, beyond TimeoutStopSec"
    assert load.errors == [], load.errors[:10]
    down = instances_down(machine, units) or {}
    for unit, shown in down.items():
        assert (shown["ActiveState"], shown["Result"], shown["ExecMainStatus"]) == (
            "inactive",
            "success",
            "0",
        ), (unit, shown)
    # Both halves finished inside http.drain_seconds: neither drain was cut short.
    cut = {"worker_drain_cut_short", "http_drain_cut_short"}
    assert not [e for e in courier_lines(machine) if e.get("event") in cut]

    machine.systemctl("start", "courier.target", timeout=120)
    await asyncio.to_thread(wait_all_ready, machine, units)
    await wait_completed(image, list(load.accepted))
    await assert_delivered(image, load.accepted.values())


async def test_poweroff_under_load_loses_nothing(image: Image) -> None:
    """`systemctl poweroff` while clients keep posting: nspawn exits 0, and after the next boot
    every request the image accepted completes. Last: it powers the fixture's machine off."""
    load, status = await under_load(image, image.machine.poweroff)
    print(f"poweroff under load: {load.summary()}")
    assert status == 0, image.machine.console()[-3000:]
    assert load.errors == [], load.errors[:10]
    with nspawn.booted(image.machine.root) as again:
        image.machine = again
        await asyncio.to_thread(wait_all_ready, again, image.instances())
        await wait_completed(image, list(load.accepted))
        await assert_delivered(image, load.accepted.values())
