#!/usr/bin/env bash
# The guard around the test suite: what this machine's own Docker engine
# and its own mlops agent hold (and libvirt's domains, networks and pools,
# which the VM tier uses) must be exactly the same after the suite as
# before it. The tests run on test hosts with their own engines and agent
# directories; a test that reached the machine's engine or agent (left a
# container, removed a volume, restarted a service, wrote an agent file)
# shows up here, named.
#
#   guard.sh snapshot FILE          record the machine's engine and agent state
#   guard.sh compare BEFORE AFTER   print what differs; exit 1 if anything does
#   guard.sh events SINCE UNTIL     what the engine did in between (Unix
#                                   seconds, fractions allowed), health checks
#                                   and the sentinel's own checks left out;
#                                   exit 1 if anything
#   guard.sh sentinel-up NAME       deploy a small stack on the machine's engine,
#                                   as a user's deployment would be: a container
#                                   writing a token into a named volume
#   guard.sh sentinel-check NAME    it still runs, never restarted, with its data
#   guard.sh sentinel-down NAME     remove it (container, volume, image)
#
# Everything the sentinel creates is named NAME (the image NAME:latest).
set -euo pipefail

# The machine's agent, as mlops_proto::layout places it.
AGENT_PATHS=(
  /etc/mlops-agent
  /usr/local/lib/mlops-agent
  /var/lib/mlops-agent
  /run/mlops-agent
  /var/log/mlops-agent
  /etc/systemd/system/mlops-agent.service
)
AGENT_PORT=7443

die() {
  echo "error: $*" >&2
  exit 2
}

snapshot() {
  local out=$1
  {
    # Containers: identity, image, state, when they last started and how
    # often they restarted (a restart by the suite changes StartedAt).
    docker ps -aq --no-trunc | while read -r id; do
      # A container removed between the list and here is simply not there.
      docker inspect --format 'container {{.Name}} id={{.Id}} image={{.Image}} state={{.State.Status}} started={{.State.StartedAt}} restarts={{.RestartCount}}' "$id" 2>/dev/null || true
    done
    docker volume ls -q | sed 's/^/volume /'
    docker network ls --no-trunc --format 'network {{.Name}} id={{.ID}}'
    docker images -a --no-trunc --format 'image {{.Repository}}:{{.Tag}} id={{.ID}}'
    for p in "${AGENT_PATHS[@]}"; do
      if [ -e "$p" ] || [ -L "$p" ]; then
        find "$p" -printf 'agent-file %p type=%y size=%s mode=%m mtime=%T@\n'
      else
        echo "agent-file $p absent"
      fi
    done
    ss -Hltn "sport = :$AGENT_PORT" | awk -v port="$AGENT_PORT" '{print "listening on agent port " port ": " $4}'
    # libvirt, which the VM tier uses: its domains, networks and pools must
    # be the same after the suite (the tier removes all it made).
    if virsh -c qemu:///system version >/dev/null 2>&1; then
      virsh -q -c qemu:///system list --all --name | sed '/^$/d; s/^/libvirt domain /'
      virsh -q -c qemu:///system net-list --all --name | sed '/^$/d; s/^/libvirt network /'
      virsh -q -c qemu:///system pool-list --all --name | sed '/^$/d; s/^/libvirt pool /'
    fi
    # Under systemd the agent has no pidfile: its unit's process and start.
    if [ -d /run/systemd/system ]; then
      systemctl show -p MainPID -p ActiveEnterTimestamp mlops-agent.service 2>/dev/null | sed 's/^/agent unit /'
    fi
  } | LC_ALL=C sort > "$out"
}

# What the engine did between two instants: a test that created and removed
# something on it leaves no trace in the snapshots, but here. Health checks
# (exec_*, health_status) run all the time and are left out, as is the
# guard's own sentinel.
events() {
  local since=$1 until=$2 seen
  seen=$(docker events --since "$since" --until "$until" \
    --format '{{.Type}} {{.Action}} {{.Actor.ID}} {{index .Actor.Attributes "name"}}' |
    grep -vE '^container (exec_[a-z]+|health_status)' | grep -v ' mlops-guard-' || true)
  if [ -z "$seen" ]; then
    echo "guard: this machine's Docker engine did nothing during the tests"
    return 0
  fi
  echo "error: during the tests, this machine's own Docker engine did:" >&2
  printf '%s\n' "$seen" | sed 's/^/  /' >&2
  echo "  hint: a test must act only on its own test hosts (mlops_e2e::TestHost), never on this machine's engine" >&2
  return 1
}

compare() {
  local before=$1 after=$2
  if cmp -s "$before" "$after"; then
    echo "guard: this machine's Docker engine and agent are as they were before the tests ($(wc -l < "$before") items)"
    return 0
  fi
  echo "error: the tests changed this machine's own Docker engine or agent:" >&2
  LC_ALL=C comm -23 "$before" "$after" | sed 's/^/  before only: /' >&2
  LC_ALL=C comm -13 "$before" "$after" | sed 's/^/  after only:  /' >&2
  echo "  hint: a test must act only on its own test hosts (mlops_e2e::TestHost), never on this machine's engine or agent; the VM tier removes every libvirt object it made (mlops_e2e::vagrant::VmTier)" >&2
  return 1
}

sentinel_up() {
  local name=$1 dir
  [ -x /bin/busybox ] || die "/bin/busybox is needed (busybox-static)"
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' RETURN
  mkdir -p "$dir/bin"
  cp /bin/busybox "$dir/bin/busybox"
  ln -s busybox "$dir/bin/sh"
  ln -s busybox "$dir/bin/cat"
  ln -s busybox "$dir/bin/sleep"
  # docker import: no builder and no registry needed.
  tar -C "$dir" -c . | docker import - "$name:latest" >/dev/null
  docker volume create --label "mlops.guard=$name" "$name" >/dev/null
  docker run -d --name "$name" --label "mlops.guard=$name" -v "$name:/data" "$name:latest" \
    sh -c "echo $name > /data/token; trap 'exit 0' TERM; sleep 2147483647 & wait" >/dev/null
  for _ in $(seq 1 50); do
    [ "$(docker exec "$name" cat /data/token 2>/dev/null)" = "$name" ] && return 0
    sleep 0.1
  done
  die "the sentinel $name did not write its token"
}

sentinel_check() {
  local name=$1 state token
  state=$(docker inspect --format '{{.State.Status}} restarts={{.RestartCount}}' "$name" 2>&1) || {
    echo "error: the sentinel stack on this machine's engine is gone: $state" >&2
    return 1
  }
  if [ "$state" != "running restarts=0" ]; then
    echo "error: the sentinel stack on this machine's engine was disturbed: $state" >&2
    return 1
  fi
  token=$(docker exec "$name" cat /data/token 2>&1) || true
  if [ "$token" != "$name" ]; then
    echo "error: the sentinel's volume lost its data: /data/token holds \`$token\`" >&2
    return 1
  fi
  echo "guard: the sentinel stack $name is running, untouched, with its volume data"
}

sentinel_down() {
  local name=$1
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker volume rm -f "$name" >/dev/null 2>&1 || true
  docker rmi -f "$name:latest" >/dev/null 2>&1 || true
}

case "${1:-}" in
  snapshot) snapshot "${2:?FILE}" ;;
  compare) compare "${2:?BEFORE}" "${3:?AFTER}" ;;
  events) events "${2:?SINCE}" "${3:?UNTIL}" ;;
  sentinel-up) sentinel_up "${2:?NAME}" ;;
  sentinel-check) sentinel_check "${2:?NAME}" ;;
  sentinel-down) sentinel_down "${2:?NAME}" ;;
  *) die "usage: $0 snapshot FILE | compare BEFORE AFTER | events SINCE UNTIL | sentinel-up|sentinel-check|sentinel-down NAME" ;;
esac
