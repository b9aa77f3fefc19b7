#!/usr/bin/env bash
# Sets up sfm from a fresh clone on Debian: audio tools, .venv, the package (dev, interop, eval,
# tpu, serve).
# SFM_EXTRAS adds comma-separated extras to those, e.g. SFM_EXTRAS=seqio (TensorFlow: ~2 GB).
# Idempotent: safe to rerun; apt is skipped when its packages are already installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(espeak-ng libespeak-ng1 sox ffmpeg flite alsa-utils codec2-examples ktuberling-data
  chromium chromium-driver)
VENV=.venv
MOSHI=moshi==0.2.13
STAMP=$VENV/.sfm-setup-stamp  # fingerprint of the last successful Python install
EXTRAS="dev,interop,eval,tpu,serve${SFM_EXTRAS:+,$SFM_EXTRAS}"

log() { echo "setup: $*"; }
fail() { echo "setup: error: $*" >&2; exit 1; }

# Runs a command with its output kept aside, shown only when it fails.
quietly() {
  local out
  out=$(mktemp)
  if ! "$@" >"$out" 2>&1; then
    cat "$out" >&2
    rm -f "$out"
    fail "failed: $*"
  fi
  rm -f "$out"
}

# What the Python install depends on: the package metadata, this script, where it lives
# and the extras asked for.
install_fingerprint() {
  cat pyproject.toml launch/setup.sh <(pwd) <(echo "$EXTRAS") | sha256sum | cut -d' ' -f1
}

check_extras() {
  [[ "$EXTRAS" =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] \
    || fail "SFM_EXTRAS must be comma-separated extra names, got '${SFM_EXTRAS:-}'"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    fail "need root or sudo to run: $*"
  fi
}

install_system_packages() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "system packages already installed"
    return
  fi
  command -v apt-get >/dev/null || fail "apt-get not found; install ${missing[*]} yourself"
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$candidate"
      return
    fi
  done
  fail "no Python >= 3.11 found (set PYTHON=/path/to/python3.11)"
}

create_venv() {
  if [ -x "$VENV/bin/python" ]; then
    log "$VENV exists"
    return
  fi
  local python
  python=$(find_python)
  log "creating $VENV with $python"
  "$python" -m venv "$VENV"
  quietly "$VENV/bin/python" -m pip install --upgrade pip
}

install_python_packages() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(install_fingerprint)" ]; then
    log "Python packages up to date (pyproject.toml and extras unchanged)"
    return
  fi
  log "installing sfm[$EXTRAS] (editable) and $MOSHI (--no-deps: it pins torch<2.10)"
  rm -f "$STAMP"
  quietly "$VENV/bin/python" -m pip install -e ".[$EXTRAS]"
  quietly "$VENV/bin/python" -m pip install --no-deps "$MOSHI"
}

# pip check, less moshi's own metadata (torch pin, server-only extras) that we knowingly skip.
check_python_packages() {
  local problems
  problems=$("$VENV/bin/python" -m pip check 2>&1 | grep -v -e '^moshi ' -e '^No broken' || true)
  [ -z "$problems" ] || fail "broken Python requirements:"$'\n'"$problems"
  import_core_packages || fail "a core package does not import"
  install_fingerprint >"$STAMP"
}

import_core_packages() {
  "$VENV/bin/python" - <<'PY'
import sys

import sfm.host

sfm.host.configure()  # the CPU platform on a host without accelerators: libtpu stays quiet

import flax
import grain
import jax
import moshi
import optax
import orbax.checkpoint
import torch

import sfm

print(f"setup: ok: python {sys.version.split()[0]}, sfm {sfm.__version__}, "
      f"jax {jax.__version__} ({jax.default_backend()}), flax {flax.__version__}, "
      f"torch {torch.__version__}, moshi {moshi.__version__}")
PY
}

summary() {
  local espeak sox ffmpeg
  espeak=$(espeak-ng --version | awk '{print $4}')
  sox=$(sox --version | awk '{print $NF}')
  ffmpeg=$(ffmpeg -version | awk 'NR == 1 {print $3}')
  log "tools: espeak-ng $espeak, sox $sox, ffmpeg $ffmpeg"
}

check_extras
install_system_packages
create_venv
install_python_packages
check_python_packages
summary
