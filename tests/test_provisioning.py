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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
