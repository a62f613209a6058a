#!/bin/bash
# Bring up an N-member (default 3) Incus cluster on this one host, next to the main lab's
# incusd (which it never touches):
#  - member i is its own incusd, INCUS_DIR=${DIRPFX}i, in network namespace ${NSPFX}i
#  - members talk over veths on the root bridge $BR ($NET.0/24), cluster address $NET.1i:8443
#  - storage pool "local" (dir); one managed bridge per member, iccbr$i = ${SUBPFX}i.1/24 (a
#    managed bridge has one subnet cluster-wide), and a root-namespace route to each subnet
#    via its member, so this host (Caddy, tests) reaches every instance
#  - image $IMAGE: the main lab's busybox image whose DHCP script also sets the default route
#    (replies must find their way back to the root namespace)
# Idempotent: a cluster that is up is left alone (exit 0 at once); leftovers of a broken one
# are removed first. Client: INCUS_DIR=${DIRPFX}1 incus ...  (any member sees the cluster)
set -euo pipefail
source "$(dirname "$0")/common.sh"
T0=$(date +%s.%N)
if cluster_ready; then log "already up"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "cluster: needs root (network namespaces, incusd)" >&2; exit 1; }
for tool in incus jq bc ip busybox; do
  command -v "$tool" >/dev/null || { echo "cluster: $tool is missing (run scripts/lab.sh up)" >&2; exit 1; }
done
if [ -n "$(ls -d /run/netns/"${NSPFX}"* "${DIRPFX}"* 2>/dev/null)" ] || ip link show "$BR" >/dev/null 2>&1; then
  log "leftovers of an earlier cluster: removing them"
  bash "$HERE/down.sh"
fi
trap 'echo "cluster: up.sh failed at line $LINENO; scripts/lab.sh cluster down cleans up" >&2' ERR
mkdir -p "$STATE"

# 1. topology
ip link add "$BR" type bridge
ip addr add "$NET.1/24" dev "$BR"
ip link set "$BR" up
for i in $(seq 1 "$N"); do
  ip netns add "${NSPFX}$i"
  ip link add "${VETHPFX}$i" type veth peer name up0 netns "${NSPFX}$i"
  ip link set "${VETHPFX}$i" master "$BR" up
  ip -n "${NSPFX}$i" addr add "$NET.1$i/24" dev up0
  ip -n "${NSPFX}$i" link set up0 up
  ip -n "${NSPFX}$i" link set lo up
done
log "network namespaces ready"

# 2. daemons (from /, detached: see lab.sh start_daemon)
getent group incus-admin >/dev/null || groupadd --system incus-admin
for i in $(seq 1 "$N"); do
  mkdir -p "${DIRPFX}$i"
  (cd / && exec setsid "$HERE/netns-incusd.sh" "${NSPFX}$i" "${DIRPFX}$i" "$STATE/m$i.log" \
    >"$STATE/m$i.out" 2>&1 < /dev/null) &
  echo $! > "$STATE/m$i.pid"          # the same pid after the exec chain: incusd's
done
for i in $(seq 1 "$N"); do mi "$i" admin waitready --timeout 60; done
log "daemons ready (pids $(cat "$STATE"/m*.pid | tr '\n' ' '))"

# 3. bootstrap on m1
mi 1 config set core.https_address "$NET.11:8443"
mi 1 storage create local dir >/dev/null
mi 1 cluster enable m1 >/dev/null
for i in $(seq 1 "$N"); do
  mi 1 network create "iccbr$i" ipv4.address="${SUBPFX}$i.1/24" ipv4.nat=false ipv6.address=none >/dev/null
done
mi 1 profile device add default root disk path=/ pool=local >/dev/null
log "m1 bootstrapped"

# 4. joins
for i in $(seq 2 "$N"); do
  tok=$(mi 1 cluster add "m$i" -q)
  printf 'cluster:\n  enabled: true\n  server_name: m%s\n  server_address: %s:8443\n  cluster_token: %s\n  member_config:\n  - entity: storage-pool\n    name: local\n    key: source\n    value: ""\n' \
    "$i" "$NET.1$i" "$tok" | mi "$i" admin init --preseed
  log "m$i joined"
done

# 5. routes from the root namespace to every member's instance subnet
for i in $(seq 1 "$N"); do ip route replace "${SUBPFX}$i.0/24" via "$NET.1$i" dev "$BR"; done

# 6. the image (lab.sh builds it against whichever incusd INCUS_DIR names)
INCUS_DIR="${DIRPFX}1" INCUS_CADDYFILE_LAB_IMAGE="$IMAGE" INCUS_CADDYFILE_LAB_ROUTE=1 \
  bash "$HERE/../lab.sh" image
log "image $IMAGE imported"
cluster_ready || { echo "cluster: not ready after up" >&2; mi 1 cluster list -f csv >&2; exit 1; }
log "cluster up: $(mi 1 cluster list -f csv -c n,s | tr '\n' ' ')"
