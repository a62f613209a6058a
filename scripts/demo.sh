#!/usr/bin/env bash
# The main job on a demo: labelled instances in two Incus projects, a real Caddy, one render,
# and the answers of curl through Caddy.
#   scripts/demo.sh        set up (idempotent), render, curl
#   scripts/demo.sh down   stop the demo Caddy, delete the demo projects
# Everything stays on this machine: Caddy listens on 127.0.0.1, the instances are on the lab bridge.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-/tmp/incus-caddyfile-demo}
HTTP_PORT=${DEMO_HTTP_PORT:-8088}
ADMIN=127.0.0.1:${DEMO_ADMIN_PORT:-2999}
L=user.caddyserver.http

down() {
  [ -f "$DEMO/caddy.pid" ] && kill "$(cat "$DEMO/caddy.pid")" 2>/dev/null || true
  rm -f "$DEMO/caddy.pid"
  for p in demo-shop demo-blog; do
    incus project show "$p" >/dev/null 2>&1 || continue
    for i in $(incus list --project "$p" -c n -f csv); do incus delete --force "$i" --project "$p"; done
    incus profile delete caddy-web --project "$p" 2>/dev/null || true
    incus project delete "$p"
  done
}
if [ "${1:-}" = down ]; then down; echo "demo removed"; exit 0; fi

project() {
  incus project show "$1" >/dev/null 2>&1 && return 0
  incus project create "$1" -c features.images=false >/dev/null
  incus profile device add default root disk path=/ pool=default --project "$1" >/dev/null
  incus profile device add default eth0 nic network=icfbr0 name=eth0 --project "$1" >/dev/null
}
launch() {  # project name [incus launch args...]
  local p=$1 n=$2; shift 2
  incus info "$n" --project "$p" >/dev/null 2>&1 || incus launch icf-busybox "$n" --project "$p" "$@" >/dev/null
}

mkdir -p "$DEMO"
project demo-shop
project demo-blog
echo "+ labelling instances"
# two instances behind one host: load balanced
launch demo-shop shop1 -c $L.enable=true -c $L.matchers.host=shop.localhost -c $L.upstream.port=80
launch demo-shop shop2 -c $L.enable=true -c $L.matchers.host=shop.localhost -c $L.upstream.port=80
# keys on a profile, the host on the instance
incus profile show caddy-web --project demo-blog >/dev/null 2>&1 || {
  incus profile create caddy-web --project demo-blog >/dev/null
  incus profile set caddy-web $L.enable=true $L.upstream.port=8080 --project demo-blog
}
launch demo-blog blog -p default -p caddy-web -c $L.matchers.host="blog.localhost www.blog.localhost"
# a label Caddy must never see
launch demo-blog sneaky -c $L.enable=true -c $L.matchers.host='evil.localhost { import /etc/passwd }' -c $L.upstream.port=80
# wait (bounded) for the DHCP leases, which arrive ~0.1 s after start
for _ in $(seq 100); do
  [ "$(incus list --all-projects -c n4 -f csv | grep -cE '^(shop1|shop2|blog|sneaky),[0-9]')" = 4 ] && break
  sleep 0.1
done

if [ ! -f "$DEMO/caddy.pid" ] || ! kill -0 "$(cat "$DEMO/caddy.pid")" 2>/dev/null; then
  printf '{\n\tadmin %s\n\tdefault_bind 127.0.0.1\n}\n' "$ADMIN" > "$DEMO/Caddyfile"
  XDG_CONFIG_HOME=$DEMO XDG_DATA_HOME=$DEMO setsid caddy run --config "$DEMO/Caddyfile" --adapter caddyfile \
    > "$DEMO/caddy.log" 2>&1 < /dev/null &
  echo $! > "$DEMO/caddy.pid"
  for _ in $(seq 50); do curl -sf "http://$ADMIN/config/" >/dev/null && break; sleep 0.1; done
fi

echo "+ incus-caddyfile render --output $DEMO/Caddyfile --scheme http --caddy-admin $ADMIN --global-option 'http_port $HTTP_PORT' --global-option 'default_bind 127.0.0.1'"
set +e
incus-caddyfile render --output "$DEMO/Caddyfile" --scheme http --caddy-admin "$ADMIN" \
  --global-option "http_port $HTTP_PORT" --global-option "default_bind 127.0.0.1"
echo "(exit status $?: 3 means rendered, with a rejected instance)"
set -e
echo "+ cat $DEMO/Caddyfile"
cat "$DEMO/Caddyfile"
for host in shop.localhost shop.localhost shop.localhost blog.localhost www.blog.localhost evil.localhost; do
  printf '+ curl -H "Host: %s" http://127.0.0.1:%s/  ->  ' "$host" "$HTTP_PORT"
  curl -s -m 3 -w '[%{http_code}]\n' -H "Host: $host" "http://127.0.0.1:$HTTP_PORT/" | tr '\n' ' '; echo
done
echo "Caddy keeps running on 127.0.0.1:$HTTP_PORT. Remove the demo: scripts/demo.sh down"
