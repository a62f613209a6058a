#!/bin/bash
# Faults of one member of the cluster from up.sh, for tests and by hand:
#   member.sh kill N    SIGKILL member N's incusd (its containers keep running and serving)
#   member.sh start N   start member N's incusd again (if it is not running) and wait for it
#   member.sh cut N     take member N's link down (a network partition; incusd keeps running)
#   member.sh mend N    bring member N's link up again
set -euo pipefail
source "$(dirname "$0")/common.sh"
i=${2:?usage: member.sh kill|start|cut|mend N}
case "$1" in
  kill)
    pid=$(member_pid "$i"); [ -z "$pid" ] || kill -KILL "$pid"
    # the pid is gone at once, but its socket file stays: wait until it no longer answers
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done ;;
  start)
    if [ -z "$(member_pid "$i")" ]; then
      (cd / && exec setsid "$HERE/netns-incusd.sh" "${NSPFX}$i" "${DIRPFX}$i" "$STATE/m$i.log" \
        >>"$STATE/m$i.out" 2>&1 < /dev/null) &
      echo $! > "$STATE/m$i.pid"
    fi
    mi "$i" admin waitready --timeout 60 ;;
  cut) ip link set "${VETHPFX}$i" down ;;
  mend) ip link set "${VETHPFX}$i" up ;;
  *) echo "usage: member.sh kill|start|cut|mend N" >&2; exit 2 ;;
esac
