"""Parse every .tf file under a directory with python-hcl2 and print one JSON document.

Runs in its own virtualenv (.venv-hcl2, created by terraform/check.sh with a pinned
python-hcl2) so that the project's environment never meets checkov's forked ``hcl2``.
tests/test_terraform.py calls it and asserts on the result.

Output: {"files": {"<path relative to the directory>": <parsed file>}}. Strings keep
Terraform expressions as "${...}". An attribute whose whole value is ``jsonencode(<expr>)``
is replaced by {"__jsonencode__": <expr parsed as HCL>}, so that policies and redrive
settings written inline can be asserted key by key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hcl2
from hcl2 import SerializationOptions

OPTIONS = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
JSONENCODE_PREFIX = "${jsonencode("
SKIPPED_DIRS = {".terraform", ".git"}


def decode_jsonencode(value: Any) -> Any:
    """Replace whole-value jsonencode(...) expressions by their parsed argument, recursively."""
    if isinstance(value, dict):
        return {key: decode_jsonencode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_jsonencode(item) for item in value]
    if isinstance(value, str) and value.startswith(JSONENCODE_PREFIX) and value.endswith(")}"):
        inner = value[len(JSONENCODE_PREFIX) : -2]
        try:
            parsed = hcl2.loads(f"value = {inner}\n", serialization_options=OPTIONS)
        except Exception:  # not one expression: keep the text (asserting tests then fail)
            return value
        return {"__jsonencode__": decode_jsonencode(parsed["value"])}
    return value


def parse_tree(root: Path) -> dict[str, Any]:
    """Parse every .tf file below ``root`` (skipping .terraform directories)."""
    files: dict[str, Any] = {}
    for path in sorted(root.rglob("*.tf")):
        relative = path.relative_to(root)
        if SKIPPED_DIRS.intersection(relative.parts):
            continue
        with path.open(encoding="utf-8") as handle:
            files[relative.as_posix()] = decode_jsonencode(
                hcl2.load(handle, serialization_options=OPTIONS)
            )
    return {"files": files}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} TERRAFORM_DIR", file=sys.stderr)
        return 2
    json.dump(parse_tree(Path(argv[1])), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
