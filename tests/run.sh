#!/usr/bin/env bash
# Runs the whole test suite on a Debian machine: installs and starts what
# the tests drive for real (OpenSSH's sshd, sudo, iproute2 for network
# namespaces, a Docker engine, busybox-static for test images), then
# `cargo test --workspace`.
#
# Needs root: the end-to-end tests create network namespaces, bind mounts
# and test users, as CI does on its fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "error: the tests need root (network namespaces, mounts, test users)" >&2
  echo "  hint: run it as root: sudo $0" >&2
  exit 2
fi

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v sudo >/dev/null 2>&1 || missing+=(sudo)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# sshd's privilege separation directory; the package creates it only on boot.
mkdir -p /run/sshd

# A Docker engine for the stack tests: started here when none answers (no
# systemd as PID 1 on CI machines). The tests fail, never skip, without one.
if ! docker version >/dev/null 2>&1; then
  echo "starting dockerd"
  setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker version >/dev/null 2>&1 || { echo "error: dockerd did not start; see /var/log/dockerd.log" >&2; tail -20 /var/log/dockerd.log >&2; exit 2; }
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# cargo prints one `test result:` line per test binary, the last often a
# crate's empty doc-tests; add them up into one closing line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
