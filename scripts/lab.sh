#!/usr/bin/env bash
# The local Incus lab used by the integration tests, the demo and the benchmarks.
#   scripts/lab.sh up      install Incus if needed, start incusd, create storage, bridge, image
#   scripts/lab.sh start   start incusd only (after it was stopped or killed)
#   scripts/lab.sh status  exit 0 when the lab is ready
#   scripts/lab.sh kill    kill the lab's incusd at once (a crash; the cluster's are left alone)
#   scripts/lab.sh down    stop incusd (instances and projects created by tests are theirs to remove)
#   scripts/lab.sh cluster up|down|status
#                          a 3-member Incus cluster next to the main incusd (scripts/cluster/)
#   scripts/lab.sh forget-leases
#                          restart incusd and the bridges' dnsmasq on empty lease files, as an
#                          incusd restart once did: running instances keep their addresses but
#                          Incus lists (almost) no leases until they renew (half the 1 h lease
#                          time), so every render asks each labelled instance for its state
# The bridge uses 198.18.77.0/24 (RFC 2544 test range), no NAT, no IPv6: nothing leaves the host.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NET=${INCUS_CADDYFILE_LAB_NETWORK:-icfbr0}
SUBNET=${INCUS_CADDYFILE_LAB_SUBNET:-198.18.77.1/24}
IMAGE=${INCUS_CADDYFILE_LAB_IMAGE:-icf-busybox}
# A second bridge, dual stack (IPv6 from the ULA range, by SLAAC), for network/family tests.
NET2=${INCUS_CADDYFILE_LAB_NETWORK2:-icfbr1}
SUBNET2=${INCUS_CADDYFILE_LAB_SUBNET2:-198.18.78.1/24}
SUBNET2_V6=${INCUS_CADDYFILE_LAB_SUBNET2_V6:-fd42:4943:4643::1/64}
LOG=/var/log/incus/incusd.log

daemon_up() { incus info >/dev/null 2>&1; }

start_daemon() {
  daemon_up && return 0
  getent group incus-admin >/dev/null || groupadd --system incus-admin
  mkdir -p /var/log/incus /var/lib/incus
  # No systemd here: run the daemon directly, detached from this shell.
  # From /: the daemon's working directory must outlive the checkout that started it
  # (rsync, run by incusd for snapshots, fails in a deleted directory).
  # setsid -f always forks: the daemon is nobody's child here, so no caller (a job runner, a
  # pipe into tail) waits for it to exit.
  (cd / && exec setsid -f /usr/libexec/incus/incusd --group incus-admin --logfile "$LOG" \
    >/dev/null 2>&1 < /dev/null)
  for _ in $(seq 1 100); do daemon_up && return 0; sleep 0.2; done
  echo "lab: incusd did not answer within 20 s; see $LOG" >&2
  return 1
}

# Bump when the image changes, so that a machine with an older lab image rebuilds it.
IMAGE_VERSION=lab-v2

build_image() {
  if incus image info "$IMAGE" >/dev/null 2>&1; then
    incus image show "$IMAGE" | grep -q "release: $IMAGE_VERSION" && return 0
    incus image delete "$IMAGE"
  fi
  local work; work=$(mktemp -d)
  local root="$work/rootfs"
  mkdir -p "$root"/{bin,sbin,etc/init.d,proc,sys,dev,tmp,run,www80,www8080,var/run}
  cp /bin/busybox "$root/bin/busybox"
  for applet in sh ip ifconfig route udhcpc httpd hostname mount cat echo sleep ls; do
    ln -s busybox "$root/bin/$applet"
  done
  ln -s ../bin/busybox "$root/sbin/init"
  cat > "$root/etc/inittab" <<'INITTAB'
::sysinit:/etc/init.d/rcS
::respawn:/bin/httpd -f -p 80 -h /www80
::respawn:/bin/httpd -f -p 8080 -h /www8080
INITTAB
  cat > "$root/etc/init.d/rcS" <<'RCS'
#!/bin/sh
mount -t proc proc /proc 2>/dev/null
name=$(hostname)
echo "hello from $name port 80" > /www80/index.html
echo "hello from $name port 8080" > /www8080/index.html
ip link set lo up
ip link set eth0 up
udhcpc -b -i eth0 -s /etc/udhcpc.script -t 50 -T 1 >/dev/null 2>&1
RCS
  cat > "$root/etc/udhcpc.script" <<'UDHCPC'
#!/bin/sh
case "$1" in
  bound|renew) ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ;;
  deconfig) ifconfig "$interface" 0.0.0.0 ;;
esac
UDHCPC
  if [ "${INCUS_CADDYFILE_LAB_ROUTE:-0}" = 1 ]; then
    # The cluster's image: its hosts reach the instances through a router (a member).
    echo '[ "$1" = bound ] && [ -n "$router" ] && route add default gw "${router%% *}" dev "$interface"' \
      >> "$root/etc/udhcpc.script"
  fi
  chmod +x "$root/etc/init.d/rcS" "$root/etc/udhcpc.script"
  printf '127.0.0.1 localhost\n::1 localhost\n' > "$root/etc/hosts"
  echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
  echo "root:x:0:" > "$root/etc/group"
  cat > "$work/metadata.yaml" <<META
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: incus-caddyfile test image (busybox httpd on ports 80 and 8080)
  os: busybox
  release: $IMAGE_VERSION
META
  tar -C "$root" -cJf "$work/rootfs.tar.xz" .
  tar -C "$work" -cJf "$work/metadata.tar.xz" metadata.yaml
  incus image import "$work/metadata.tar.xz" "$work/rootfs.tar.xz" --alias "$IMAGE" >/dev/null
  rm -rf "$work"
}

setup() {
  incus storage show default >/dev/null 2>&1 || incus storage create default dir >/dev/null
  incus network show "$NET" >/dev/null 2>&1 || \
    incus network create "$NET" ipv4.address="$SUBNET" ipv4.nat=false ipv6.address=none >/dev/null
  incus network show "$NET2" >/dev/null 2>&1 || \
    incus network create "$NET2" ipv4.address="$SUBNET2" ipv4.nat=false \
      ipv6.address="$SUBNET2_V6" ipv6.nat=false >/dev/null
  incus profile device show default | grep -q '^root:' || \
    incus profile device add default root disk path=/ pool=default >/dev/null
  incus profile device show default | grep -q '^eth0:' || \
    incus profile device add default eth0 nic network="$NET" name=eth0 >/dev/null
  build_image
}

# The pid of the lab's dnsmasq for bridge $1 (from the file incusd keeps), if it still runs.
dnsmasq_pid() {
  local dir=/var/lib/incus/networks/$1 pid cmd
  pid=$(sed -n 's/^pid: *//p' "$dir/dnsmasq.pid" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)
  case "$cmd" in *"--dhcp-leasefile=$dir/dnsmasq.leases"*) echo "$pid" ;; esac
}

# The daemon itself, not its helpers (/usr/libexec/incus/incusd forkfile ... and the like),
# nor the cluster's member daemons (scripts/cluster: each has an INCUS_DIR of its own).
incusd_pids() {
  local pid
  for pid in $(pgrep -f '^/usr/libexec/incus/incusd( --|$)' || true); do
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -q '^INCUS_DIR=' || echo "$pid"
  done
}

# Dynamic leases Incus lists on bridge $1, over all projects.
lease_count() {
  local n=0 project
  for project in $(incus project list -f csv -c n | sed 's/ (current)$//'); do
    n=$((n + $(incus query "/1.0/networks/$1/leases?project=$project" | grep -c '"dynamic"' || true)))
  done
  echo "$n"
}

forget_leases() {
  local pids pid net
  # Stop incusd (instances keep running), then each bridge's dnsmasq, which holds the
  # leases in memory and would write them back; empty the lease files while none runs.
  pids=$(incusd_pids)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    for _ in $(seq 1 100); do
      [ -z "$(incusd_pids)" ] && break
      sleep 0.2
    done
    pids=$(incusd_pids)
    if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; sleep 0.5; fi
  fi
  for net in "$NET" "$NET2"; do
    pid=$(dnsmasq_pid "$net")
    if [ -n "$pid" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
      done
    fi
    if [ -f "/var/lib/incus/networks/$net/dnsmasq.leases" ]; then
      : > "/var/lib/incus/networks/$net/dnsmasq.leases"
    fi
  done
  start_daemon  # which starts each bridge's dnsmasq again, on its empty file
  for net in "$NET" "$NET2"; do
    for _ in $(seq 1 100); do
      [ -n "$(dnsmasq_pid "$net")" ] && break
      sleep 0.2
    done
    echo "lab: $net lists $(lease_count "$net") lease(s); running instances keep their" \
      "addresses and are listed again as they renew"
  done
}

case "${1:-up}" in
  up)
    [ "$(id -u)" = 0 ] && bash "$here/install-deps.sh" >/dev/null
    start_daemon
    setup
    echo "lab: incusd up, networks $NET ($SUBNET) and $NET2 ($SUBNET2, $SUBNET2_V6), image $IMAGE"
    ;;
  start)
    start_daemon
    ;;
  kill)  # (tests, the soak) kill the lab's incusd at once, as a crash would; instances keep
         # running; the cluster's member daemons are left alone
    pids=$(incusd_pids)
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    ;;
  status)
    daemon_up && incus image info "$IMAGE" >/dev/null 2>&1 && incus network show "$NET" >/dev/null 2>&1 \
      && incus network show "$NET2" >/dev/null 2>&1
    ;;
  down)
    pids=$(incusd_pids)
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    ;;
  image)  # (used by scripts/cluster/up.sh) the image, in whichever incusd INCUS_DIR names
    build_image
    ;;
  cluster)
    case "${2:-}" in
      up) [ "$(id -u)" = 0 ] && bash "$here/install-deps.sh" >/dev/null
          bash "$here/cluster/up.sh" ;;
      down) bash "$here/cluster/down.sh" ;;
      status) bash -c 'source "$1/cluster/common.sh"; cluster_ready' status "$here" ;;
      *) echo "usage: $0 cluster up|down|status" >&2; exit 2 ;;
    esac
    ;;
  forget-leases)
    forget_leases
    ;;
  *) echo "usage: $0 up|start|status|down|forget-leases|cluster up|down|status" >&2; exit 2 ;;
esac
