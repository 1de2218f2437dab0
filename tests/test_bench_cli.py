"""``make bench`` on a machine without wrk: one line naming the install command, no traceback.

The check runs in a subprocess with a PATH that has only the interpreter's directory (or that
plus a stand-in wrk), the way a fresh machine looks; nothing is started, so it takes a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = "from bench.api import require_wrk; print(require_wrk())"


def run_check(path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


WRK_MISSING = "bench: wrk is not on PATH; install it with: sudo apt-get install wrk"


def test_without_wrk_bench_stops_with_one_line_naming_the_install() -> None:
    done = run_check(str(Path(sys.executable).parent))
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [WRK_MISSING]
    assert "Traceback" not in done.stderr


def test_with_wrk_on_path_the_check_passes(tmp_path: Path) -> None:
    wrk = tmp_path / "wrk"
    wrk.write_text("#!/bin/sh\nexit 0\n")
    wrk.chmod(0o755)
    done = run_check(f"{Path(sys.executable).parent}{os.pathsep}{tmp_path}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(wrk)
