"""With ``CI`` set a skip fails the run, unless tests/conftest.py allows it with a reason.

Each case runs pytest for real, on one real test, with a plugin that makes it skip (as a
missing tool would), xfail, or allows its skip the way CI_ALLOWED_SKIPS does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGET = "tests/test_settings.py::test_settings_are_frozen"
PLUGIN = """
import os, sys
import pytest

def pytest_runtest_setup(item):
    mode = os.environ["FAKE_SKIP"]
    if mode == "allowed":
        allowed = sys.modules["tests.conftest"].CI_ALLOWED_SKIPS
        allowed[item.nodeid.split("::")[0] + "::*frozen"] = "no such tool exists on CI machines"
    if mode == "xfail":
        pytest.xfail("a known bug")
    pytest.skip("the tool is not installed")
"""


def run_pytest(tmp_path: Path, mode: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "fake_skip.py").write_text(PLUGIN)
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    env.update({"PYTHONPATH": str(tmp_path), "FAKE_SKIP": mode})
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "fake_skip",
         TARGET],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_skip_fails_the_run_in_ci(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "skip", "true")
    out = result.stdout
    assert result.returncode == 1, out
    assert "the tool is not installed" in out
    assert "CI is set and this skip is not allowed" in out
    assert "1 error" in out.splitlines()[-1], out
    assert "skipped" not in out.splitlines()[-1], out


@pytest.mark.parametrize("ci", [None, "false"])
def test_a_skip_stays_a_skip_outside_ci(tmp_path: Path, ci: str | None) -> None:
    result = run_pytest(tmp_path, "skip", ci)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout.splitlines()[-1], result.stdout


def test_an_allowed_skip_passes_and_is_listed_with_its_reason(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "allowed", "true")
    out = result.stdout
    assert result.returncode == 0, out
    assert "1 skipped" in out.splitlines()[-1], out
    assert "skips allowed in CI" in out, out
    summary = out.split("skips allowed in CI", 1)[1]
    assert "tests/test_settings.py::*frozen: no such tool exists on CI machines" in summary
    assert f"{TARGET}: the tool is not installed" in summary


def test_an_xfail_is_not_a_skip(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "xfail", "true")
    assert result.returncode == 0, result.stdout
    assert "1 xfailed" in result.stdout.splitlines()[-1], result.stdout


def test_a_skipped_module_fails_the_run_in_ci(tmp_path: Path) -> None:
    """pytest.skip(allow_module_level=True), as an importorskip at the top of a file does."""
    module = tmp_path / "test_needs_a_tool.py"
    module.write_text(
        'import pytest\n\npytest.skip("no such tool", allow_module_level=True)\n\n\n'
        "def test_never() -> None:\n    pass\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "tests.conftest", str(module)]
    # 2: collection error; 5: no test ran, as pytest reports a skipped module outside CI
    for ci, code, last in [("true", 2, "1 error"), (None, 5, "1 skipped")]:
        run_env = env if ci is None else {**env, "CI": ci}
        result = subprocess.run(
            command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert result.returncode == code, result.stdout
        assert last in result.stdout.splitlines()[-1], result.stdout
