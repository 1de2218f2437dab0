"""The Packer template: formatted, and valid for the Packer this machine has.

Debian's packer (1.6.6) is older than the template's target: it knows neither the
`packer { required_plugins }` block (kept alone in plugins.pkr.hcl for that reason) nor
`metadata_options`/`imds_support` (fenced by `# packer>=1.7: begin/end` comments). The
template is checked twice: `validate -syntax-only` on the real files minus plugins.pkr.hcl,
and a full `validate` (variables, references, builder and provisioner settings, input
paths) on a copy of the tree with the fenced lines removed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKER = REPO / "packer"
NEWER_ONLY = re.compile(r"^[ \t]*# packer>=1\.7: begin.*?# packer>=1\.7: end[^\n]*\n", re.S | re.M)

# Only the tests that run packer need it; the others read the template and files themselves.
needs_packer = pytest.mark.skipif(
    shutil.which("packer") is None, reason="packer is not installed (Debian package: packer)"
)


def packer(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "CHECKPOINT_DISABLE": "1", "HOME": "/tmp"}
    return subprocess.run(
        ["packer", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def template_copy(tmp_path: Path, *, strip_newer: bool) -> Path:
    """packer/ without plugins.pkr.hcl, in a tree shaped like the repository."""
    tree = tmp_path / "repo"
    copy = tree / "packer"
    copy.mkdir(parents=True)
    for hcl in PACKER.glob("*.pkr.hcl"):
        if hcl.name != "plugins.pkr.hcl":
            text = hcl.read_text()
            (copy / hcl.name).write_text(NEWER_ONLY.sub("", text) if strip_newer else text)
    (copy / "files").symlink_to(PACKER / "files")
    (copy / "scripts").symlink_to(PACKER / "scripts")
    (tree / "systemd").symlink_to(REPO / "systemd")
    # The wheelhouse is a build product (scripts/build-wheelhouse.sh); validate only needs
    # the directory to exist.
    (tree / "dist" / "wheelhouse").mkdir(parents=True)
    return copy


@needs_packer
def test_fmt_check() -> None:
    result = packer("fmt", "-check", "-diff", str(PACKER))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_packer
def test_validate_syntax_only(tmp_path: Path) -> None:
    result = packer("validate", "-syntax-only", str(template_copy(tmp_path, strip_newer=False)))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_packer
@pytest.mark.parametrize(
    "variables",
    [
        [],
        ["-var", "ssh_interface=session_manager", "-var", "kms_key_id=alias/courier-ami"],
        ["-var", "source_ami_name=al2023-ami-2023.*-x86_64", "-var", "ssh_username=ec2-user",
         "-var", 'source_ami_owners=["amazon"]', "-var", "install_cloudwatch_agent=false"],
    ],
    ids=["defaults", "session-manager-cmk", "amazon-linux"],
)  # fmt: skip
def test_validate_without_newer_blocks(tmp_path: Path, variables: list[str]) -> None:
    result = packer("validate", *variables, str(template_copy(tmp_path, strip_newer=True)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_fenced_lines_are_stripped() -> None:
    text = (PACKER / "courier.pkr.hcl").read_text()
    removed = "".join(m.group(0) for m in NEWER_ONLY.finditer(text))
    assert "metadata_options" in removed
    assert 'http_tokens                 = "required"' in removed
    assert 'imds_support = "v2.0"' in removed
    assert removed.count("\n") < 12


def test_required_plugins_live_alone() -> None:
    plugins = (PACKER / "plugins.pkr.hcl").read_text()
    assert 'source  = "github.com/hashicorp/amazon"' in plugins
    assert 'version = ">= 1.3.0"' in plugins
    for other in PACKER.glob("*.pkr.hcl"):
        if other.name != "plugins.pkr.hcl":
            assert "required_plugins" not in other.read_text()


def test_template_secure_defaults() -> None:
    text = (PACKER / "courier.pkr.hcl").read_text()
    variables = (PACKER / "variables.pkr.hcl").read_text()
    assert re.search(r"owners\s*=\s*var\.source_ami_owners", text)
    assert '"136693071363"' in variables
    assert '"debian-12-amd64-*"' in variables
    assert re.search(r"encrypted\s*=\s*true", text)
    assert re.search(r'volume_type\s*=\s*"gp3"', text)
    assert "kms_key_id" in text
    # The template only orchestrates: one shell provisioner, one script.
    assert text.count('provisioner "shell"') == 1
    assert "inline" not in text
    assert 'script          = "${path.root}/scripts/provision.sh"' in text


def test_cloudwatch_agent_config() -> None:
    config = json.loads((PACKER / "files" / "cloudwatch-agent.json").read_text())
    files = config["logs"]["logs_collected"]["files"]["collect_list"]
    assert [f["file_path"] for f in files] == ["/var/log/courier/courier.log"]
    assert all(f["log_group_name"].startswith("/courier/") for f in files)
    prometheus = config["logs"]["metrics_collected"]["prometheus"]
    assert prometheus["emf_processor"]["metric_namespace"] == "Courier"
    assert prometheus["prometheus_config_path"].endswith("/courier-prometheus.yaml")
    scrape = (PACKER / "files" / "prometheus.yaml").read_text()
    ports = [int(p) for p in re.findall(r"- localhost:(\d+)", scrape)]
    assert ports == list(range(9101, 9165))


def test_cloudwatch_metric_selectors_name_real_metrics() -> None:
    """Every selector matches a series courier exposes (names drift; CloudWatch stays silent)."""
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401  (registers courier_* metrics)

    suffixes = {"counter": ("_total",), "histogram": ("_sum", "_count", "_bucket")}
    series = {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    config = json.loads((PACKER / "files" / "cloudwatch-agent.json").read_text())
    processor = config["logs"]["metrics_collected"]["prometheus"]["emf_processor"]
    for declaration in processor["metric_declaration"]:
        for selector in declaration["metric_selectors"]:
            assert any(re.fullmatch(selector.strip("^$"), name) for name in series), selector
