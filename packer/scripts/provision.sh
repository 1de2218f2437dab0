#!/usr/bin/env bash
# provision.sh - turn a Debian 12 or Amazon Linux 2023 machine into a courier host.
#
# Run as root, once per image build (packer/courier.pkr.hcl uploads the inputs and runs it)
# or in a chroot (tests/test_provisioning.py runs it in a fresh debootstrap root). It is
# idempotent: running it again gives the same machine. It never starts courier: the AMI's
# user data writes /etc/courier/courier.toml, and courier.target starts one process per vCPU.
#
# Inputs (environment):
#   WHEELHOUSE            directory of wheels: courier and all its runtime dependencies
#                         (scripts/build-wheelhouse.sh); installed with no index, offline
#   SYSTEMD_SRC           the repository's systemd/ directory (units, generator, env example)
#   CW_CONFIG             CloudWatch agent configuration (packer/files/cloudwatch-agent.json)
#   CW_PROMETHEUS_CONFIG  its Prometheus scrape configuration (packer/files/prometheus.yaml)
#   SKIP_CLOUDWATCH_AGENT 1: do not download/install the agent (tests, machines without S3);
#                         its configuration files are still put in place
#   AWS_REGION            region whose S3 bucket the agent is downloaded from (Debian)
#   COURIER_PYTHON        interpreter for the virtualenv (default: python3.11, else python3)
set -euo pipefail

WHEELHOUSE=${WHEELHOUSE:-/tmp/wheelhouse}
SYSTEMD_SRC=${SYSTEMD_SRC:-/tmp/systemd}
CW_CONFIG=${CW_CONFIG:-/tmp/courier-cloudwatch-agent.json}
CW_PROMETHEUS_CONFIG=${CW_PROMETHEUS_CONFIG:-/tmp/courier-prometheus.yaml}
SKIP_CLOUDWATCH_AGENT=${SKIP_CLOUDWATCH_AGENT:-}
AWS_REGION=${AWS_REGION:-us-east-1}

PREFIX=/opt/courier
VENV=$PREFIX/venv
UNIT_DIR=/usr/lib/systemd/system
GENERATOR_DIR=/usr/lib/systemd/system-generators
CONFIG_DIR=/etc/courier
CW_DIR=/opt/aws/amazon-cloudwatch-agent
# The key that signs the CloudWatch agent packages, as published by AWS
# ("Verifying the signature of the CloudWatch agent package").
CW_GPG_FINGERPRINT=937616F3450B7D806CBD9725D58167303B789C72

log() { printf 'provision: %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

check_inputs() {
  [[ $(id -u) -eq 0 ]] || die "must run as root"
  compgen -G "$WHEELHOUSE/courier-*.whl" >/dev/null || die "no courier wheel in WHEELHOUSE=$WHEELHOUSE"
  local f
  for f in courier@.service courier.target courier-generator courier-journal-export.service courier.env.example; do
    [[ -f $SYSTEMD_SRC/$f ]] || die "missing $SYSTEMD_SRC/$f"
  done
  [[ -f $CW_CONFIG ]] || die "missing CW_CONFIG=$CW_CONFIG"
  [[ -f $CW_PROMETHEUS_CONFIG ]] || die "missing CW_PROMETHEUS_CONFIG=$CW_PROMETHEUS_CONFIG"
}

distro() {
  # shellcheck disable=SC1091
  . /etc/os-release
  case "$ID" in
    debian) echo debian ;;
    amzn) echo amzn ;;
    *) die "unsupported distribution: $ID (Debian 12 and Amazon Linux 2023 are)" ;;
  esac
}

install_packages() {
  case "$1" in
    debian)
      export DEBIAN_FRONTEND=noninteractive
      local wanted=(python3 python3-venv ca-certificates logrotate) missing=() p
      [[ -n $SKIP_CLOUDWATCH_AGENT ]] || wanted+=(curl gnupg)
      for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
      done
      if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
        apt-get clean
        rm -rf /var/lib/apt/lists/*
      fi
      ;;
    amzn)
      # Amazon Linux 2023's python3 is 3.9: courier needs 3.11.
      dnf install -y -q python3.11 logrotate shadow-utils
      [[ -n $SKIP_CLOUDWATCH_AGENT ]] || dnf install -y -q amazon-cloudwatch-agent
      dnf clean all
      ;;
  esac
}

python_for_venv() {
  local py=${COURIER_PYTHON:-}
  if [[ -z $py ]]; then
    py=$(command -v python3.11 || command -v python3) || die "no python3"
  fi
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$py is older than 3.11"
  echo "$py"
}

create_user() {
  local nologin
  nologin=$(command -v nologin || echo /usr/sbin/nologin)
  getent group courier >/dev/null || groupadd --system courier
  if getent passwd courier >/dev/null; then
    usermod --gid courier --shell "$nologin" --home /nonexistent courier
  else
    useradd --system --gid courier --shell "$nologin" --home-dir /nonexistent --no-create-home \
      --comment "courier daemon" courier
  fi
  [[ $(getent shadow courier | cut -d: -f2) == '!'* ]] || usermod --lock courier
}

install_venv() {
  local py
  py=$(python_for_venv)
  # Rebuilt from scratch every run: the result depends only on the wheelhouse. The wheels
  # are installed with no index: the image build never reaches PyPI.
  log "creating $VENV with $py"
  rm -rf "$VENV"
  install -d -m 0755 -o root -g root "$PREFIX"
  "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links "$WHEELHOUSE" --only-binary=:all: courier
  "$VENV/bin/python" -m pip check --disable-pip-version-check
  # Bytecode now, as root: the service cannot write to the venv.
  "$VENV/bin/python" -m compileall -q "$VENV/lib" >/dev/null
  # root-owned and read-only for everybody else, courier included.
  chown -R root:root "$PREFIX"
  chmod -R u+rwX,go+rX,go-w "$PREFIX"
  "$VENV/bin/courier" --version
}

install_units() {
  install -d -m 0755 "$UNIT_DIR" "$GENERATOR_DIR"
  install -m 0644 -o root -g root "$SYSTEMD_SRC/courier@.service" "$SYSTEMD_SRC/courier.target" \
    "$SYSTEMD_SRC/courier-journal-export.service" "$UNIT_DIR/"
  install -m 0755 -o root -g root "$SYSTEMD_SRC/courier-generator" "$GENERATOR_DIR/courier-generator"

  # Settings: root writes, the courier group reads, nobody else sees.
  install -d -m 0750 -o root -g courier "$CONFIG_DIR"
  install -m 0640 -o root -g courier "$SYSTEMD_SRC/courier.env.example" "$CONFIG_DIR/courier.env.example"
  local f
  for f in "$CONFIG_DIR/courier.toml" "$CONFIG_DIR/courier.env"; do
    if [[ -e $f ]]; then
      chown root:courier "$f"
      chmod 0640 "$f"
    fi
  done

  cat >/etc/logrotate.d/courier-journal-export <<'EOF'
# courier's JSON log lines (courier-journal-export.service), tailed by the CloudWatch agent.
/var/log/courier/courier.log {
  daily
  maxsize 100M
  rotate 7
  missingok
  notifempty
  copytruncate
  compress
  delaycompress
}
EOF
  chmod 0644 /etc/logrotate.d/courier-journal-export

  # Offline enable (works in a chroot, no running systemd needed): symlinks only.
  systemctl --root=/ enable courier.target courier-journal-export.service
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
  fi
}

install_cloudwatch_agent() {
  local os=$1
  if [[ -n $SKIP_CLOUDWATCH_AGENT ]]; then
    log "SKIP_CLOUDWATCH_AGENT set: not installing the CloudWatch agent"
  elif [[ $os == debian && ! -x $CW_DIR/bin/amazon-cloudwatch-agent-ctl ]]; then
    local arch base tmp
    arch=$(dpkg --print-architecture)
    base="https://amazoncloudwatch-agent-$AWS_REGION.s3.$AWS_REGION.amazonaws.com"
    tmp=$(mktemp -d)
    log "downloading the CloudWatch agent from $base"
    curl -fsSL --proto =https --tlsv1.2 -o "$tmp/agent.gpg" "$base/assets/amazon-cloudwatch-agent.gpg"
    curl -fsSL --proto =https --tlsv1.2 -o "$tmp/agent.deb" "$base/debian/$arch/latest/amazon-cloudwatch-agent.deb"
    curl -fsSL --proto =https --tlsv1.2 -o "$tmp/agent.deb.sig" "$base/debian/$arch/latest/amazon-cloudwatch-agent.deb.sig"
    export GNUPGHOME=$tmp/gnupg
    install -d -m 0700 "$GNUPGHOME"
    gpg --batch --quiet --import "$tmp/agent.gpg"
    gpg --batch --with-colons --fingerprint | grep -q "^fpr:*$CW_GPG_FINGERPRINT:" ||
      die "CloudWatch agent signing key fingerprint is not $CW_GPG_FINGERPRINT"
    gpg --batch --quiet --verify "$tmp/agent.deb.sig" "$tmp/agent.deb" ||
      die "CloudWatch agent package signature does not verify"
    dpkg -i "$tmp/agent.deb"
    unset GNUPGHOME
    rm -rf "$tmp"
  fi

  install -d -m 0755 "$CW_DIR/etc"
  install -m 0644 -o root -g root "$CW_CONFIG" "$CW_DIR/etc/courier-agent.json"
  install -m 0644 -o root -g root "$CW_PROMETHEUS_CONFIG" "$CW_DIR/etc/courier-prometheus.yaml"
  if [[ -z $SKIP_CLOUDWATCH_AGENT ]]; then
    # Translate and install the configuration now (no -s: do not start during the build);
    # the agent starts at boot. Terraform's user data fetches its own config over this one.
    "$CW_DIR/bin/amazon-cloudwatch-agent-ctl" -a fetch-config -m ec2 \
      -c "file:$CW_DIR/etc/courier-agent.json"
    systemctl --root=/ enable amazon-cloudwatch-agent.service
  fi
}

main() {
  umask 0022
  check_inputs
  local os
  os=$(distro)
  install_packages "$os"
  create_user
  install_venv
  install_units
  install_cloudwatch_agent "$os"
  log "done: $("$VENV/bin/courier" --version); courier.target enabled"
}

main "$@"
