"""The systemd units of the image: clean under `systemd-analyze`, hardened, and livable.

systemd is not PID 1 here, so nothing is started: `systemd-analyze verify` and `security
--offline` read the unit files from a temporary root that mirrors the image (this host's
stock units, ours in /usr/lib/systemd/system, a stand-in /opt/courier/venv/bin/courier,
because verify refuses an ExecStart binary that does not exist). The sandbox settings
that could break the daemon at run time are reproduced in a child process instead:
MemoryDenyWriteExecute (both ways systemd implements it), the system-call filter and
the address families, around uvloop, cryptography and aiohttp doing real work.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from courier_testkit.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_SRC = REPO / "systemd"
UNITS = ("courier@.service", "courier.target", "courier-journal-export.service")
EXPOSURE_LIMIT = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)


def unit_directives(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (comments and sections ignored)."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD_SRC / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def make_unit_root(root: Path) -> Path:
    """A filesystem root with the host's stock units, ours, and every ExecStart binary."""
    system = root / "usr/lib/systemd/system"
    shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
    for name in UNITS:
        shutil.copy2(SYSTEMD_SRC / name, system / name)
    for name in UNITS:
        for command in unit_directives(name).get("ExecStart", []):
            binary = root / command.split()[0].lstrip("-+!@:").lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            if not binary.exists():
                binary.write_text("#!/bin/sh\n")
                binary.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


# --- systemd-analyze ----------------------------------------------------------------------


@needs_analyze
def test_units_verify_without_any_output(tmp_path: Path) -> None:
    """verify only warns on unknown keys and still exits 0: any output is a failure."""
    root = make_unit_root(tmp_path)
    result = analyze(
        "verify", f"--root={root}", "courier@1.service", "courier.target",
        "courier-journal-export.service",
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_verify_catches_a_missing_binary_and_an_unknown_key(tmp_path: Path) -> None:
    """The check above would notice: a typo and a missing ExecStart both produce output."""
    root = make_unit_root(tmp_path)
    (root / "opt/courier/venv/bin/courier").unlink()
    unit = root / "usr/lib/systemd/system/courier@.service"
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nProtectSystm=strict\n"))
    result = analyze("verify", f"--root={root}", "courier@1.service")
    output = result.stdout + result.stderr
    assert "Unknown key 'ProtectSystm'" in output
    assert "/opt/courier/venv/bin/courier is not executable" in output


@needs_analyze
def test_service_exposure_is_at_most_two(tmp_path: Path) -> None:
    root = make_unit_root(tmp_path)
    result = analyze(
        "security", "--offline=yes", f"--root={root}", f"--threshold={int(EXPOSURE_LIMIT * 10)}",
        "courier@1.service",
    )  # fmt: skip
    match = re.search(r"Overall exposure level for courier@1\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security: courier@1.service exposure {exposure}")
    assert exposure <= EXPOSURE_LIMIT
    assert result.returncode == 0, result.stdout


@needs_analyze
def test_journal_export_exposure_is_at_most_two(tmp_path: Path) -> None:
    root = make_unit_root(tmp_path)
    result = analyze(
        "security", "--offline=yes", f"--root={root}", "--threshold=20",
        "courier-journal-export.service",
    )  # fmt: skip
    print(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout


# --- what the unit promises ---------------------------------------------------------------


def test_service_contract() -> None:
    """The settings the daemon, the generator and the CloudWatch agent rely on."""
    unit = unit_directives("courier@.service")
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == ["/opt/courier/venv/bin/courier run"]
    assert "COURIER_INSTANCE=%i" in unit["Environment"]
    assert "COURIER_HTTP_METRICS_PORT=9100" in unit["Environment"]
    assert unit["EnvironmentFile"] == ["-/etc/courier/courier.env"]
    assert (unit["User"], unit["Group"]) == (["courier"], ["courier"])
    assert unit["WatchdogSec"] == ["30"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["PartOf"] == ["courier.target"]
    # The daemon drains for at most http.drain_seconds (20 s by default) after SIGTERM.
    assert unit["KillSignal"] == ["SIGTERM"]
    assert int(unit["TimeoutStopSec"][0]) >= 20 + 5
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]


def test_a_stop_ends_before_timeout_stop_sec(tmp_path: Path) -> None:
    """systemd SIGKILLs at TimeoutStopSec, which would skip releasing unfinished messages and
    flushing deletes. The API and the worker drain against one deadline (http.drain_seconds),
    then the release and flush (worker.release_seconds) and the exit must still fit: with the
    unit's environment, and with the values courier.env.example suggests."""
    from service import daemon
    from service.settings import load_settings

    unit = unit_directives("courier@.service")
    timeout = float(unit["TimeoutStopSec"][0])
    environ = dict(value.split("=", 1) for value in unit["Environment"] if "%" not in value)
    example = (SYSTEMD_SRC / "courier.env.example").read_text()
    suggested = dict(re.findall(r"^#(COURIER_\w+)=(\S+)$", example, flags=re.MULTILINE))
    assert "COURIER_HTTP_DRAIN_SECONDS" in suggested
    empty = tmp_path / "courier.toml"
    empty.write_text("")
    for env in (environ, {**environ, **suggested}):
        settings = load_settings(empty, env)
        drain, release = settings.http.drain_seconds, settings.worker.release_seconds
        assert drain + release + daemon.EXIT_SECONDS < timeout, env
        assert daemon.stop_bound_seconds(settings) < timeout, env


# --- generator ------------------------------------------------------------------------------


def run_generator(tmp_path: Path, nproc: str | None) -> list[str]:
    normal, early, late = (tmp_path / d for d in ("normal", "early", "late"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if nproc is not None:
        env["COURIER_NPROC"] = nproc
    subprocess.run(
        ["/bin/sh", str(SYSTEMD_SRC / "courier-generator"), str(normal), str(early), str(late)],
        env=env,
        check=True,
        timeout=10,
    )
    assert not early.exists()
    assert not late.exists()
    wants = normal / "courier.target.wants"
    for link in wants.iterdir():
        assert link.is_symlink()
        assert os.readlink(link) == "/usr/lib/systemd/system/courier@.service"
    return sorted(p.name for p in wants.iterdir())


@pytest.mark.parametrize("count", [1, 2, 8, 64])
def test_generator_wants_one_instance_per_cpu(tmp_path: Path, count: int) -> None:
    assert run_generator(tmp_path, str(count)) == sorted(
        f"courier@{i}.service" for i in range(1, count + 1)
    )


def test_generator_defaults_to_nproc(tmp_path: Path) -> None:
    count = len(os.sched_getaffinity(0))
    assert len(run_generator(tmp_path, None)) == count


@pytest.mark.parametrize(("given", "expected"), [("0", 1), ("junk", 1), ("-3", 1), ("500", 99)])
def test_generator_clamps_bad_counts(tmp_path: Path, given: str, expected: int) -> None:
    assert len(run_generator(tmp_path, given)) == expected


def test_generator_is_idempotent(tmp_path: Path) -> None:
    """systemd reruns generators on daemon-reload into the same (emptied) directory;
    a rerun over existing links must not fail either."""
    assert run_generator(tmp_path, "3") == run_generator(tmp_path, "3")


def test_generator_is_posix_sh() -> None:
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("dash is not installed")
    subprocess.run([dash, "-n", str(SYSTEMD_SRC / "courier-generator")], check=True)


# --- the sandbox, reproduced ---------------------------------------------------------------

# Runs in a fresh interpreter: applies the restrictions first, then imports and exercises
# the stack. Kept self-contained (ctypes only) so it can be read on its own.
SANDBOX_PROBE = textwrap.dedent(
    r"""
    import ctypes, ctypes.util, errno, json, mmap, os, socket, sys

    mode = sys.argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 66, 1
    PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000

    def check(rc, what):
        if rc != 0:
            raise OSError(ctypes.get_errno(), what)

    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")

    if mode == "mdwe-prctl":
        # systemd >= 253 on Linux >= 6.3: MemoryDenyWriteExecute=yes is this prctl.
        check(libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")
        assert libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) == PR_MDWE_REFUSE_EXEC_GAIN
    else:
        # systemd 252 (Debian 12) and older kernels: seccomp filters, built with libseccomp
        # the way systemd builds them.
        seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
        seccomp.seccomp_init.restype = ctypes.c_void_p
        seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
        seccomp.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
        seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
        seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

        class ArgCmp(ctypes.Structure):
            _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                        ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

        ALLOW, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 4, 7
        def errno_action(code):
            return 0x00050000 | code

        def nr(name):
            return seccomp.seccomp_syscall_resolve_name(name.encode())

        def rule(ctx, action, name, *cmps):
            number = nr(name)
            if number < 0:
                return  # not a syscall on this architecture
            array = (ArgCmp * max(len(cmps), 1))(*cmps)
            rc = seccomp.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
            if rc not in (0, -errno.EEXIST):
                raise OSError(-rc, f"seccomp_rule_add {name}")

        # MemoryDenyWriteExecute=yes, as systemd 252's seccomp_memory_deny_write_execute().
        mdwe = seccomp.seccomp_init(ALLOW)
        rule(mdwe, errno_action(errno.EPERM), "mmap",
             ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
        for name in ("mprotect", "pkey_mprotect"):
            rule(mdwe, errno_action(errno.EPERM), name,
                 ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        rule(mdwe, errno_action(errno.EPERM), "shmat",
             ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        check(seccomp.seccomp_load(mdwe), "seccomp_load mdwe")

        if mode == "unit-sandbox":
            # Both MemoryDenyWriteExecute implementations at once, where the kernel has both.
            if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0:
                check(libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")
            # RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX.
            families = seccomp.seccomp_init(ALLOW)
            for family in range(1, 46):
                if family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
                    rule(families, errno_action(errno.EAFNOSUPPORT), "socket",
                         ArgCmp(0, SCMP_CMP_EQ, family, 0))
            check(seccomp.seccomp_load(families), "seccomp_load address families")
            # SystemCallFilter=@system-service ~@privileged @resources with
            # SystemCallErrorNumber=EPERM: everything else fails with EPERM. Loaded last:
            # seccomp() itself is not in the allow-list.
            allowed = json.loads(os.environ["COURIER_ALLOWED_SYSCALLS"])
            allow = seccomp.seccomp_init(errno_action(errno.EPERM))
            for name in allowed:
                rule(allow, ALLOW, name)
            check(seccomp.seccomp_load(allow), "seccomp_load allow-list")

    # The restriction is really in force, or this probe proves nothing.
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as exc:
        assert exc.errno in (errno.EPERM, errno.EACCES), exc
    else:
        raise AssertionError("a writable+executable mapping was allowed")
    if mode == "unit-sandbox":
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
        except OSError as exc:
            assert exc.errno == errno.EAFNOSUPPORT, exc
        else:
            raise AssertionError("AF_NETLINK was allowed")

    if len(sys.argv) > 2:  # run a program under the same restrictions (they survive exec)
        os.execv(sys.argv[2], sys.argv[2:])

    # Now the stack: import after the restrictions, as the service does.
    import asyncio, ssl
    import uvloop
    import aiohttp
    from aiohttp import web
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    import jwt
    import service.cli, service.app, service.envelope  # the daemon's own import graph

    key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, b"mailbox" * 100, b"header")
    assert AESGCM(key).decrypt(nonce, sealed, b"header") == b"mailbox" * 100
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_key.public_key().verify(ec_key.sign(b"m", ec.ECDSA(hashes.SHA256())), b"m",
                               ec.ECDSA(hashes.SHA256()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signature = rsa_key.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    rsa_key.public_key().verify(signature, b"m", padding.PKCS1v15(), hashes.SHA256())
    token = jwt.encode({"sub": "x"}, ec_key, algorithm="ES256")
    assert jwt.decode(token, ec_key.public_key(), algorithms=["ES256"])["sub"] == "x"
    ssl.create_default_context().load_default_certs()

    async def round_trip():
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async def hello(request):
            return web.json_response({"echo": await request.text()})
        app = web.Application()
        app.router.add_post("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, reuse_port=True)
        await site.start()
        port = runner.addresses[0][1]
        try:
            # By name: getaddrinfo(AI_ADDRCONFIG) falls back when netlink is refused.
            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    async with session.post(f"http://localhost:{port}/", data="hi") as resp:
                        assert resp.status == 200 and (await resp.json()) == {"echo": "hi"}
        finally:
            await runner.cleanup()

    uvloop.run(round_trip())
    print(f"{mode}: uvloop {uvloop.__version__}, aiohttp {aiohttp.__version__}, all fine")
    """
)


def syscall_group(name: str) -> set[str]:
    """Syscall names of a systemd filter group, nested groups expanded (systemd-analyze)."""
    out = analyze("syscall-filter", name).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        names |= syscall_group(entry) if entry.startswith("@") else {entry}
    return names


def run_probe(mode: str, tmp_path: Path, extra_env: dict[str, str] | None = None) -> str:
    probe = tmp_path / "probe.py"
    probe.write_text(SANDBOX_PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    result = subprocess.run(
        [sys.executable, str(probe), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def kernel_has_mdwe() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(66, 0, 0, 0, 0) >= 0  # PR_GET_MDWE


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
@pytest.mark.skipif(not kernel_has_mdwe(), reason="kernel older than 6.3: no PR_SET_MDWE")
def test_stack_works_under_kernel_mdwe(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes as systemd >= 253 applies it on Linux >= 6.3."""
    print(run_probe("mdwe-prctl", tmp_path).strip())


needs_libseccomp = pytest.mark.skipif(
    platform.machine() != "x86_64" or not __import__("ctypes.util").util.find_library("seccomp"),
    reason="needs libseccomp (Debian package libseccomp2) on x86_64",
)


@needs_libseccomp
def test_stack_works_under_seccomp_mdwe(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes as systemd 252 (Debian 12) applies it: seccomp."""
    print(run_probe("mdwe-seccomp", tmp_path).strip())


@needs_libseccomp
@needs_analyze
def test_stack_works_under_the_units_syscall_filter(tmp_path: Path) -> None:
    """SystemCallFilter, SystemCallErrorNumber, RestrictAddressFamilies and MDWE together."""
    unit = unit_directives("courier@.service")
    assert unit["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    allowed = syscall_group("@system-service") - set().union(
        *(syscall_group(group) for group in ("@privileged", "@resources"))
    )
    env = {"COURIER_ALLOWED_SYSCALLS": __import__("json").dumps(sorted(allowed))}
    print(run_probe("unit-sandbox", tmp_path, env).strip())


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_proc_subset_pid_would_hide_process_metrics(tmp_path: Path) -> None:
    """Why the unit has ProtectProc=invisible but not ProcSubset=pid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount /proc in a private namespace")
    code = (
        "from prometheus_client import ProcessCollector, CollectorRegistry;"
        "r = CollectorRegistry(); ProcessCollector(registry=r);"
        "print(sorted(m.name for m in r.collect()))"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c",
         'mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec "$0" -c "$1"',
         sys.executable, code],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0 and "mount" in result.stderr:
        pytest.skip(f"cannot mount proc with subset=pid here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # no process_cpu_seconds, no RSS, no fds


@needs_libseccomp
@needs_analyze
@pytest.mark.timeout(120)
def test_whole_chain_runs_under_the_units_sandbox(tmp_path: Path) -> None:
    """`courier local` (daemon, moto, stubs) under MDWE + syscall filter + address families:
    ready, a mailbox goes through API, SQS, worker and the legacy stubs, SIGTERM exits 0."""
    import json
    import signal
    import time
    import urllib.request

    (tmp_path / "probe.py").write_text(SANDBOX_PROBE)
    allowed = syscall_group("@system-service") - set().union(
        *(syscall_group(group) for group in ("@privileged", "@resources"))
    )
    port = free_port()
    courier = str(Path(sys.executable).with_name("courier"))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "COURIER_ALLOWED_SYSCALLS": json.dumps(sorted(allowed)),
    }
    env.pop("NOTIFY_SOCKET", None)
    daemon = subprocess.Popen(
        [sys.executable, str(tmp_path / "probe.py"), "unit-sandbox", courier, "local",
         "--port", str(port), "--aws-port", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert daemon.poll() is None, daemon.communicate()[0]
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.3)
        config = tmp_path / ".courier" / "local.toml"
        token = subprocess.run(
            [courier, "--config", str(config), "token"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        body = {"username": "jane.doe", "display_name": "Jane Doe", "plan": "standard",
                "contact_email": "jane@example.com"}  # fmt: skip
        request = urllib.request.Request(
            f"{base}/v1/mailboxes",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        status: dict[str, object] = {}
        while time.monotonic() < deadline + 30 and status.get("status") != "completed":
            time.sleep(0.3)
            get = urllib.request.Request(f"{base}{location}", headers=request.headers)
            with urllib.request.urlopen(get, timeout=10) as resp:
                status = json.loads(resp.read())
        assert status.get("status") == "completed", status
    finally:
        daemon.send_signal(signal.SIGTERM)
        output = daemon.communicate(timeout=40)[0]
    assert daemon.returncode == 0, output[-3000:]
    print(f"courier local under the unit sandbox: request {status['request_id']} completed")
