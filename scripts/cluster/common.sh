# Settings shared by scripts/cluster/*.sh (sourced). Every name carries the prefix icc, so
# nothing here can be mistaken for the main lab's incusd (/var/lib/incus, icfbr*).
N=${ICC_MEMBERS:-3}                          # members m1..mN (N <= 9)
STATE=${ICC_STATE:-/var/lib/icc-cluster}     # pid files, logs
DIRPFX=${ICC_DIRPFX:-/var/lib/icc-m}         # INCUS_DIR of member i = ${DIRPFX}i
NSPFX=${ICC_NSPFX:-icc-m}                    # network namespace of member i = ${NSPFX}i
BR=${ICC_BRIDGE:-iccbr0}                     # root-namespace bridge joining the members
VETHPFX=${ICC_VETHPFX:-iccv}                 # root side of member i's veth (inside: up0)
NET=${ICC_NET:-198.18.100}                   # root: $NET.1, member i: $NET.1i (cluster, :8443)
SUBPFX=${ICC_SUBPFX:-198.18.10}              # member i's instance bridge iccbr$i = ${SUBPFX}i.1/24
IMAGE=${ICC_IMAGE:-icc-busybox}              # the lab image, with a default route (see up.sh)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mi() { INCUS_DIR="${DIRPFX}$1" incus "${@:2}"; }   # mi 2 list  -> the client against member 2
log() { printf 'cluster: [%6.1fs] %s\n' "$(echo "$(date +%s.%N) - ${T0:-$(date +%s.%N)}" | bc)" "$*"; }
# The member daemons' pids (from their pid files), if they run.
member_pid() {
  local pid; pid=$(cat "$STATE/m$1.pid" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}
# Exit 0 when every member answers, is Online, and the image is there.
cluster_ready() {
  local i online
  for i in $(seq 1 "$N"); do
    [ -S "${DIRPFX}$i/unix.socket" ] || return 1
    timeout 5 env INCUS_DIR="${DIRPFX}$i" incus query /1.0 >/dev/null 2>&1 || return 1
  done
  online=$(timeout 10 env INCUS_DIR="${DIRPFX}1" incus query /1.0/cluster/members?recursion=1 2>/dev/null \
    | jq '[.[] | select(.status == "Online")] | length') || return 1
  [ "$online" = "$N" ] || return 1
  timeout 5 env INCUS_DIR="${DIRPFX}1" incus image info "$IMAGE" >/dev/null 2>&1
}
