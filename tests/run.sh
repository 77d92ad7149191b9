#!/usr/bin/env bash
# Runs the whole test suite on a Debian machine: installs what the tests
# drive for real (OpenSSH's sshd, sudo, iproute2 for network namespaces,
# docker.io for the test hosts' own engines, busybox-static for test
# images, curl, debootstrap, python3-venv for the inventory tests'
# ansible-core, fontconfig for the bench crate's plots; Vagrant,
# vagrant-libvirt, libvirt and QEMU for the VM tier), then
# `cargo test --workspace`, inside a guard.
#
# The guard: the tests act only on test hosts of their own (network and
# mount namespaces, each with its own sshd, agent directories and dockerd).
# Before the suite, this script deploys a small sentinel stack on this
# machine's own Docker engine (as a user's deployment would be) and records
# what that engine and this machine's agent hold; after it, anything that
# differs fails the run, named, and the sentinel must still run with its
# volume data. A platform deployed here with `mlopsctl deploy` is left as
# it was.
#
# Needs root: the end-to-end tests create network namespaces and mounts.
# Without arguments it runs everything, the VM tier (package tests/vm) in
# the background beside the namespace tiers. Extra arguments select what
# `cargo test` runs instead (e.g. `tests/run.sh -p mlops-e2e --test stack`,
# or `tests/run.sh -p mlops-vm-tier` for the VM tier alone).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "error: the tests need root (network namespaces, mounts)" >&2
  echo "  hint: run it as root: sudo $0" >&2
  exit 2
fi

started=$(date +%s)
phase_started=$started
# Seconds since the previous call, and the phase's name, on one line.
phase() {
  local now
  now=$(date +%s)
  echo "time: $1: $((now - phase_started)) s"
  phase_started=$now
}

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v sudo >/dev/null 2>&1 || missing+=(sudo)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# The agent builds a missing Debian base image with debootstrap; installed
# here so that no test host installs a package on this machine.
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
# The bench crate (built by `cargo test --workspace`) draws its report's
# plots with plotters, which links fontconfig and needs one TrueType font.
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists fontconfig 2>/dev/null || missing+=(libfontconfig1-dev)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
# The inventory tests compare mlopsctl with ansible-inventory, installed
# from PyPI into a virtualenv of their own.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# The VM tier (tests/vm): Vagrant with libvirt, QEMU, qemu-img
# for the boxes it builds.
command -v vagrant >/dev/null 2>&1 || missing+=(vagrant)
compgen -G '/usr/share/rubygems-integration/all/gems/vagrant-libvirt-*' >/dev/null || missing+=(vagrant-libvirt)
command -v libvirtd >/dev/null 2>&1 || missing+=(libvirt-daemon-system)
command -v virsh >/dev/null 2>&1 || missing+=(libvirt-clients)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
if ! command -v qemu-img >/dev/null 2>&1 && command -v qemu-system-x86_64 >/dev/null 2>&1; then
  missing+=(qemu-utils)
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  # qemu-utils from the release's own suite: a newer one (from backports)
  # declares that it breaks the release's qemu-system (seen on CI images).
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  missing+=(qemu-system-x86 "qemu-utils/$codename")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # --no-remove: never take a package away to make room for these.
  apt-get install -y -q --no-install-recommends --allow-downgrades --no-remove "${missing[@]}"
fi

# This machine's own engine is needed only for the guard's sentinel (the
# tests never use it). Started here when none answers (no systemd as PID 1
# on CI machines); a user's running engine is used as it is.
started_engine=
if ! docker version >/dev/null 2>&1; then
  echo "starting this machine's dockerd (for the guard's sentinel; the tests use engines of their own; stopped at the end)"
  setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
  started_engine=$!
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker version >/dev/null 2>&1 || { echo "error: dockerd did not start; see /var/log/dockerd.log" >&2; tail -20 /var/log/dockerd.log >&2; exit 2; }
fi

work=$(mktemp -d)
# The run's image depot (see image_depot in tests/src/lib.rs): the
# platform's images, built by the first test that deploys it, are loaded
# by the later ones instead of built again. Gigabytes: under /var/tmp, as
# /tmp may be RAM.
depot=$(mktemp -d /var/tmp/mlops-test-images-XXXXXX)
export MLOPS_TEST_IMAGE_DEPOT="$depot"
sentinel="mlops-guard-$$"
started_libvirt=
started_virtlogd=
vm_job=
platform_job=
cleanup() {
  # Interrupted while the VM tier or the platform test runs in the
  # background: stop them (what they made is then left for the guard to name).
  # Their logs' ends are printed first: a run cut short (CI's time limit)
  # still shows where each was.
  if [ -n "$vm_job" ]; then
    kill -- "-$vm_job" 2>/dev/null || true
    echo "== the VM tier, stopped; its log's last lines:"
    tail -n 60 "$work/vm-log" 2>/dev/null || true
  fi
  if [ -n "$platform_job" ]; then
    kill -- "-$platform_job" 2>/dev/null || true
    echo "== the platform test, stopped; its log's last lines:"
    tail -n 60 "$work/platform-log" 2>/dev/null || true
    for steps in "${CARGO_TARGET_DIR:-target}"/tmp/steps-*.txt; do
      if [ -f "$steps" ] && [ "$(stat -c %Y "$steps")" -ge "${suite_started%.*}" ]; then
        cat "$steps"
      fi
    done
  fi
  tests/guard.sh sentinel-down "$sentinel"
  rm -rf "$work" "$depot"
  if [ -n "$started_libvirt" ] && [ -f /run/libvirtd.pid ]; then
    kill "$(cat /run/libvirtd.pid)" 2>/dev/null || true
  fi
  if [ -n "$started_virtlogd" ] && [ -f /run/virtlogd.pid ]; then
    kill "$(cat /run/virtlogd.pid)" 2>/dev/null || true
  fi
  if [ -n "$started_engine" ]; then
    kill "$started_engine" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$started_engine" 2>/dev/null || break; sleep 0.5; done
  fi
}
trap cleanup EXIT
# libvirtd for the VM tier, started here when none answers (no systemd as
# PID 1 on CI machines) and stopped at the end; a running one is used as it
# is (the tier makes a pool, networks and domains of its own, and removes them).
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  echo "starting libvirtd and virtlogd (for the VM tier; stopped at the end)"
  if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d
    started_virtlogd=1
  fi
  libvirtd -d
  started_libvirt=1
  for _ in $(seq 1 40); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.5
  done
  virsh -c qemu:///system version >/dev/null 2>&1 || { echo "error: libvirtd did not start" >&2; exit 2; }
fi

tests/guard.sh sentinel-up "$sentinel"
tests/guard.sh snapshot "$work/before"
suite_started=$(date +%s.%N)
phase "setup (packages, engine, guard)"

set +e
if [ $# -gt 0 ]; then
  # A selection (e.g. `-p mlops-e2e --test stack`): run as asked. No
  # --workspace here: it would override `-p` (`-p mlops-vm-tier` alone
  # ran every package); without `-p`, this virtual workspace runs all
  # its members anyway.
  cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$work/log"
  status=${PIPESTATUS[0]}
  phase "build and tests"
else
  # The whole suite. Everything is built first (every test binary, and the
  # release agent the VM tier ships), so that the runs below only run.
  # Three at once, each a process of its own: the VM tier (its own
  # package), the platform test (tests/platform.rs, the longest: about
  # half of it waits on Airflow, a core left idle) and the other namespace
  # tests. One after the other they would take well over an hour; the
  # machine's two cores are busy instead. The background runs' output is
  # printed when all have ended.
  { cargo test --workspace --locked --no-run && cargo agent-static --locked; } 2>&1 | tee "$work/log"
  status=${PIPESTATUS[0]}
  phase "build"
  if [ "$status" = 0 ]; then
    platform_test=the_platform_comes_up_works_and_keeps_its_history
    setsid cargo test -p mlops-vm-tier --locked --no-fail-fast >"$work/vm-log" 2>&1 < /dev/null &
    vm_job=$!
    setsid cargo test -p mlops-e2e --test platform --locked --no-fail-fast -- --exact "$platform_test" \
      >"$work/platform-log" 2>&1 < /dev/null &
    platform_job=$!
    # Every other test, whatever binary it is in (a new one included);
    # --exact: only that test's own name is skipped.
    cargo test --workspace --exclude mlops-vm-tier --locked --no-fail-fast -- --exact --skip "$platform_test" 2>&1 | tee -a "$work/log"
    status=${PIPESTATUS[0]}
    phase "namespace tiers but the platform test (it and the VM tier running beside them)"
    wait "$platform_job"
    platform_status=$?
    platform_job=
    echo "== the platform test (tests/platform.rs), run beside them:"
    cat "$work/platform-log"
    cat "$work/platform-log" >> "$work/log"
    # Renamed or moved, it would match nothing and pass: it must have run.
    if [ "$platform_status" = 0 ] && ! grep -q "^test result: ok\. 1 passed" "$work/platform-log"; then
      echo "error: the platform test ($platform_test in tests/tests/platform.rs) did not run" >&2
      echo "  hint: tests/run.sh names it; keep the two in step" >&2
      platform_status=1
    fi
    phase "the platform test's remainder"
    wait "$vm_job"
    vm_status=$?
    vm_job=
    echo "== the VM tier (tests/vm), run beside the namespace tiers:"
    cat "$work/vm-log"
    cat "$work/vm-log" >> "$work/log"
    phase "the VM tier's remainder"
    [ "$status" != 0 ] || status=$platform_status
    [ "$status" != 0 ] || status=$vm_status
  fi
fi
set -e

guard=0
tests/guard.sh snapshot "$work/after"
tests/guard.sh compare "$work/before" "$work/after" || guard=1
tests/guard.sh events "$suite_started" "$(date +%s.%N)" || guard=1
tests/guard.sh sentinel-check "$sentinel" || guard=1

# Each test binary's time, then one closing line over all of them (cargo
# prints one `test result:` line per binary, the last often a crate's empty
# doc-tests).
awk '/^     Running / { name = $2; if (name == "unittests") { name = $NF; gsub(/^.*\/|-[0-9a-f]+\)$/, "", name); name = name " (unit tests)" } }
     /^test result:/ && name != "" { for (i = 1; i <= NF; i++) if ($i == "in") t = $(i+1); printf "time: %s: %s\n", name, t; name = "" }' "$work/log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$work/log"
# The VM tier's steps (its test's output is captured when it passes).
vm_times=${CARGO_TARGET_DIR:-target}/tmp/vm-tier-times.txt
if [ -f "$vm_times" ] && [ "$(stat -c %Y "$vm_times")" -ge "${suite_started%.*}" ]; then
  sed 's/^vm-time: /time: vm tier: /' "$vm_times"
fi
# The long namespace tests' steps (StepTimes in tests/src/lib.rs).
for steps in "${CARGO_TARGET_DIR:-target}"/tmp/steps-*.txt; do
  if [ -f "$steps" ] && [ "$(stat -c %Y "$steps")" -ge "${suite_started%.*}" ]; then
    cat "$steps"
  fi
done
echo "time: whole run: $(( $(date +%s) - started )) s"
# Each failing test's last lines, last: a log read from its end (or cut
# in its middle) still shows why each failed, not only that it did.
awk '/^---- .* stdout ----$/ { if (name != "") flush(); name = $2; n = 0; next }
     name != "" && (/^failures:$/ || /^---- /) { flush(); name = "" }
     name != "" { buf[n++] = $0 }
     function flush(  i, from) { from = n > 40 ? n - 40 : 0; printf "== failed: %s (its last %d lines)\n", name, n - from; for (i = from; i < n; i++) print buf[i] }
     END { if (name != "") flush() }' "$work/log"
if [ "$guard" != 0 ]; then
  echo "summary: the guard failed: the tests changed this machine's own engine, agent or libvirt objects (see above)" >&2
  exit 1
fi
exit "$status"
