#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: Debian packages, a running dockerd, the venv.
# Run as root (CI and the dev machines are root). Safe to run again: every step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(docker.io debootstrap rsync openssh-client libnfs-utils acl attr
      qemu-system-x86 busybox-static bash-static cpio kmod xfsprogs shellcheck)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A docker engine: start dockerd when the socket does not answer.
if ! docker version >/dev/null 2>&1; then
  echo "setup: starting dockerd"
  mkdir -p /var/log
  nohup /usr/sbin/dockerd >/var/log/qrmfs-dockerd.log 2>&1 &
  for _ in $(seq 1 120); do
    docker version >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker version >/dev/null 2>&1 || { echo "setup: dockerd did not come up, see /var/log/qrmfs-dockerd.log" >&2; exit 1; }
fi

# The venv with the project and its test extra; reinstalled only when pyproject.toml changed.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.qrmfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing qrmfs into .venv"
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >.venv/pip.log 2>&1; then
    tail -30 .venv/pip.log >&2
    echo "setup: pip install failed (full log: .venv/pip.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "setup: ok"
