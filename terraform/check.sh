#!/usr/bin/env bash
# Offline checks of the courier Terraform: fmt, init + validate (module and example),
# `terraform test` against a mocked provider, checkov with zero failures, the
# python-hcl2 environment tests/test_terraform.py parses with, and a real
# `terraform apply` / plan / destroy of examples/complete against moto
# (courier_testkit/terraform_moto.py, 3 to 4 minutes).
#
# Usage: bash terraform/check.sh          (from anywhere; writes nothing into the repo
#                                          except the git-ignored .venv-checkov/.venv-hcl2)
#        bash terraform/check.sh --hcl-env only create .venv-hcl2 (`make hcl-env`)
# Env:   TF_PLUGIN_MIRROR=<dir>           plugin dir holding registry.terraform.io/hashicorp/aws
#        PYTHON=python3.11                interpreter for the two tool virtualenvs
#        COURIER_PYTHON=<python>          the project's interpreter, with moto and boto3
#                                         (default .venv/bin/python: `make install`)
set -euo pipefail

CHECKOV_VERSION=3.3.30
PYTHON_HCL2_VERSION=8.1.4

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
python=${PYTHON:-python3}
started=$SECONDS

export CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1 TF_INPUT=0
# A TF_CLI_CONFIG_FILE naming a missing file only produces a warning on every command.
if [[ -n "${TF_CLI_CONFIG_FILE:-}" && ! -e "$TF_CLI_CONFIG_FILE" ]]; then
  unset TF_CLI_CONFIG_FILE
fi

step() { printf '\n== %s\n' "$*"; }
die() {
  printf 'FAIL: %b\n' "$*" >&2
  exit 1
}

ensure_venv() { # dir, distribution, version
  local dir=$1 name=$2 version=$3 installed=""
  if [[ -x "$dir/bin/python" ]]; then
    installed=$("$dir/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
      "$name" 2>/dev/null || true)
  fi
  if [[ "$installed" != "$version" ]]; then
    step "creating $(basename "$dir") with $name==$version"
    "$python" -m venv "$dir"
    # The machine's pip configuration may list local indexes that lack most packages; pip
    # then warns once per package and location. Drop that noise, keep everything else.
    { "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$name==$version" 2>&1; } |
      { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  fi
  # Never committed, whatever the repository's .gitignore says.
  printf '*\n' >"$dir/.gitignore"
}

# `check.sh --hcl-env`: only the python-hcl2 environment (what the test-suite and `make fleet`
# parse the .tf files with), without terraform.
if [[ "${1:-}" == "--hcl-env" ]]; then
  ensure_venv "$repo/.venv-hcl2" python-hcl2 "$PYTHON_HCL2_VERSION"
  exit 0
fi

command -v terraform >/dev/null || die "terraform is not installed (need >= 1.5)"

# --- 1. formatting ----------------------------------------------------------------------
step "terraform fmt -check -recursive terraform/"
terraform fmt -check -recursive -diff "$here" || die "terraform fmt: run 'terraform fmt -recursive terraform/'"
fmt_result="fmt ok"

# --- 2. init + validate + test, offline against the local provider mirror ----------------
find_mirror() {
  local pattern='*registry.terraform.io/hashicorp/aws/5.*/linux_amd64'
  local root found
  for root in "${TF_PLUGIN_MIRROR:-}" /usr/share/terraform/providers /usr/local/share/terraform \
    "$HOME/.terraform.d/plugins" /opt; do
    [[ -n "$root" && -d "$root" ]] || continue
    found=$(find "$root" -type d -path "$pattern" 2>/dev/null | sort -V | tail -1 || true)
    [[ -n "$found" ]] && break
  done
  if [[ -z "${found:-}" ]]; then
    found=$(find / -xdev -type d -path "$pattern" 2>/dev/null | head -1 || true)
  fi
  [[ -n "${found:-}" ]] && printf '%s\n' "${found%%/registry.terraform.io/*}"
  return 0
}

mirror=$(find_mirror)
if [[ -z "$mirror" ]]; then
  step "terraform validate"
  echo "SKIP terraform validate: no provider mirror found (set TF_PLUGIN_MIRROR to a directory holding registry.terraform.io/hashicorp/aws/<version>/linux_amd64)"
  validate_result="validate SKIPPED (no provider mirror)"
else
  # Validate a copy in a temporary directory: init writes .terraform/ and a lock file, and
  # none of that belongs in the repository.
  work=$(mktemp -d "${TMPDIR:-/tmp}/courier-terraform-check.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar -C "$here" --exclude=.terraform --exclude='*.tfstate*' --exclude=.terraform.lock.hcl -cf - . |
    tar -C "$work" -xf -
  for root in . examples/complete; do
    label=terraform/${root#.}
    step "terraform init + validate: ${label%/} (plugins from $mirror)"
    (
      cd "$work/$root"
      terraform init -backend=false -input=false -no-color -plugin-dir="$mirror" >init.log 2>&1 ||
        { cat init.log; exit 1; }
      terraform validate -no-color
    ) || die "terraform validate failed in ${label%/}"
  done
  step "terraform test (mocked AWS provider: variable validation, preconditions, rendering)"
  test_output=$(cd "$work" && terraform test -no-color 2>&1) || {
    printf '%s\n' "$test_output"
    die "terraform test failed"
  }
  printf '%s\n' "$test_output" | grep -E '^(  run |tests/|Success|Failure)' || true
  test_summary=$(printf '%s\n' "$test_output" | grep -Eo '[0-9]+ passed, [0-9]+ failed' | tail -1 || true)
  validate_result="validate ok (module + examples/complete), terraform test ${test_summary:-ran}"
fi

# --- 3. tool virtualenvs (their own: checkov ships a fork of hcl2) ------------------------
ensure_venv "$repo/.venv-checkov" checkov "$CHECKOV_VERSION"
ensure_venv "$repo/.venv-hcl2" python-hcl2 "$PYTHON_HCL2_VERSION"

# --- 4. checkov: zero failed checks; every skip inline with a reason ----------------------
step "checkov $CHECKOV_VERSION (offline)"
bad_skips=$(grep -rnE --include='*.tf' 'checkov:skip=' "$here" | grep -vE 'checkov:skip=CKV2?_AWS_[0-9]+:.{10,}' || true)
[[ -z "$bad_skips" ]] || die "checkov skips without a written reason:\n$bad_skips"
grep -rnE --include='*.tf' -o 'checkov:skip=[^:]+:.*' "$here" | sed "s|^$here/|  skip  |" || true
set +e
checkov_output=$(cd "$repo" && CKV_SKIP_PACKAGE_UPDATE_CHECK=true "$repo/.venv-checkov/bin/checkov" \
  --skip-download --quiet --compact -d terraform --framework terraform 2>&1)
checkov_status=$?
set -e
printf '%s\n' "$checkov_output"
checkov_counts=$(printf '%s\n' "$checkov_output" |
  grep -Eo 'Passed checks: [0-9]+, Failed checks: [0-9]+, Skipped checks: [0-9]+' | head -1 || true)
[[ -n "$checkov_counts" ]] || die "checkov printed no result line"
[[ $checkov_status -eq 0 && "$checkov_counts" == *"Failed checks: 0,"* ]] || die "checkov: $checkov_counts"

# --- 5. the parser environment tests/test_terraform.py uses --------------------------------
step "python-hcl2 $PYTHON_HCL2_VERSION parses every .tf file"
"$repo/.venv-hcl2/bin/python" "$here/scripts/hcl2json.py" "$here" >/dev/null || die "hcl2json could not parse terraform/"

# --- 6. terraform apply, plan, destroy of examples/complete against moto ------------------
if [[ -z "$mirror" ]]; then
  step "terraform apply against moto"
  echo "SKIP terraform apply: no provider mirror found (see terraform validate above)"
  apply_result="apply SKIPPED (no provider mirror)"
else
  project_python=${COURIER_PYTHON:-$repo/.venv/bin/python}
  [[ -x "$project_python" ]] || die "no project interpreter at $project_python: run 'make install'"
  step "terraform apply + plan + destroy of examples/complete against moto"
  # Each terraform command has its own timeout inside; this one bounds the whole cycle.
  (cd "$repo" && timeout --kill-after=30 1500 "$project_python" -m courier_testkit.terraform_moto \
    --plugin-dir "$mirror") | tee "$work/apply.log" || die "terraform apply against moto failed"
  apply_result=$(grep -Eo '[0-9]+ created, [0-9]+ known drift attributes, destroyed clean' \
    "$work/apply.log" | tail -1 || true)
  apply_result="apply against moto: ${apply_result:-ok}"
fi

printf '\nterraform-check: OK - %s; %s; checkov %s; hcl2 parser ok; %s (%ss)\n' \
  "$fmt_result" "$validate_result" "$checkov_counts" "$apply_result" "$((SECONDS - started))"
