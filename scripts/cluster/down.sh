#!/bin/bash
# Tear down everything up.sh created, and only that: our network namespaces, veths, bridge and
# routes, the processes of our member daemons (by pid file, by namespace, or as children of
# "[lxc monitor] ${DIRPFX}i/containers"), ${DIRPFX}1..N and $STATE. Never the main incusd.
set -uo pipefail
source "$(dirname "$0")/common.sh"
T0=$(date +%s.%N)
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# 1. delete instances through the API while the cluster answers (the clean path)
if [ -S "${DIRPFX}1/unix.socket" ] && timeout 10 env INCUS_DIR="${DIRPFX}1" incus query /1.0 >/dev/null 2>&1; then
  timeout 60 env INCUS_DIR="${DIRPFX}1" incus query '/1.0/instances?all-projects=true&recursion=1' 2>/dev/null |
    jq -r '.[] | "\(.project) \(.name)"' | while read -r p n; do
      timeout 30 env INCUS_DIR="${DIRPFX}1" incus delete -f --project "$p" "$n" >/dev/null 2>&1 || true; done
  log "instances deleted"
fi
# 2. stop the daemons (TERM, KILL after 5 s: the last members can block on the lost quorum)
for i in $(seq "$N" -1 1); do pid=$(member_pid "$i"); alive "$pid" && kill -TERM "$pid"; done
for i in $(seq "$N" -1 1); do
  pid=$(cat "$STATE/m$i.pid" 2>/dev/null || true)
  for _ in $(seq 1 10); do alive "$pid" || break; sleep 0.5; done
  alive "$pid" && kill -KILL "$pid"
done
log "daemons stopped"
# 3. containers left running (children of our lxc monitors), and the monitors
for pid in $(pgrep -f "^\[lxc monitor\] ${DIRPFX}[0-9]+/containers " || true); do
  for c in $(cat "/proc/$pid/task/$pid/children" 2>/dev/null); do kill -KILL "$c"; done
  kill -KILL "$pid"
done
sleep 0.5
# 3b. empty cgroups LXC leaves when a container dies with its daemon (our names only)
for i in $(seq 1 "$N"); do
  for n in $(ls "${DIRPFX}$i/containers" 2>/dev/null); do
    for d in /sys/fs/cgroup/lxc.payload."$n" /sys/fs/cgroup/lxc.monitor."$n" \
             /sys/fs/cgroup/*/lxc.payload."$n" /sys/fs/cgroup/*/lxc.monitor."$n"; do
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  done
done
# 4. anything else in our namespaces (dnsmasq, forkproxy ...)
for i in $(seq 1 "$N"); do
  [ -e "/run/netns/${NSPFX}$i" ] || continue
  for pid in $(ip netns pids "${NSPFX}$i"); do kill -KILL "$pid" 2>/dev/null; done
done
sleep 0.5
# 5. network
for i in $(seq 1 "$N"); do
  ip route del "${SUBPFX}$i.0/24" 2>/dev/null
  ip link del "${VETHPFX}$i" 2>/dev/null
  [ -e "/run/netns/${NSPFX}$i" ] && ip netns del "${NSPFX}$i"
done
ip link del "$BR" 2>/dev/null
# `ip netns add` bind-mounted /run/netns onto itself; undo that only when it is empty
if [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then umount /run/netns 2>/dev/null; rmdir /run/netns 2>/dev/null; fi
# 6. data (refused while anything is still mounted there)
for i in $(seq 1 "$N"); do
  d="${DIRPFX}$i"; [ -e "$d" ] || continue
  if grep -q " $d[/ ]" /proc/self/mountinfo; then echo "cluster: mounts remain under $d, not removed" >&2; continue; fi
  rm -rf --one-file-system "$d"
done
rm -rf "$STATE"
log "down"
