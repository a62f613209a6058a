#!/usr/bin/env bash
# Install what the lab needs on Debian bookworm: Incus from bookworm-backports (the daemon is
# not in main) and busybox-static for the tiny test image; for the edge appliance
# (scripts/appliance.sh and its tests): debootstrap, squashfs-tools, incus-simplestreams
# (incus-extra, bookworm-backports) and Pebble, a real ACME server; Chromium and Pebble for the
# tests of watch --listen. Idempotent; needs root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
backports() {
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/backports.list
  fi
}
updated=0
update() { [ "$updated" = 1 ] || { apt-get update -qq; updated=1; }; }
if [ ! -x /usr/libexec/incus/incusd ] || ! command -v incus >/dev/null || [ ! -x /bin/busybox ] || [ ! -x /usr/sbin/dnsmasq ] || ! command -v curl >/dev/null; then
  backports
  update
  apt-get install -y -qq -t bookworm-backports --no-install-recommends incus-base incus-client >/dev/null
  apt-get install -y -qq --no-install-recommends busybox-static dnsmasq-base curl xz-utils iproute2 >/dev/null
fi
# The Incus cluster of scripts/cluster (lab.sh cluster up): jq, bc, ip netns.
if ! command -v jq >/dev/null || ! command -v bc >/dev/null || ! command -v ip >/dev/null; then
  update
  apt-get install -y -qq --no-install-recommends jq bc iproute2 >/dev/null
fi
appliance_tools="debootstrap mksquashfs unsquashfs incus-simplestreams pebble pebble-challtestsrv openssl zstd flock findmnt"
for tool in $appliance_tools; do
  if ! command -v "$tool" >/dev/null; then
    backports
    update
    apt-get install -y -qq --no-install-recommends debootstrap squashfs-tools pebble openssl zstd \
      util-linux >/dev/null
    apt-get install -y -qq -t bookworm-backports --no-install-recommends incus-extra >/dev/null
    break
  fi
done
# The status page's browser test (Debian's Chromium, driven by Playwright from the test extras)
# and the on-demand TLS test against a real ACME server (Pebble with its DNS test server).
if ! command -v chromium >/dev/null || ! command -v pebble >/dev/null || ! command -v pebble-challtestsrv >/dev/null || ! command -v openssl >/dev/null; then
  update
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core pebble openssl >/dev/null
fi
# bench/routing.py (make bench) loads Caddy with wrk.
if ! command -v wrk >/dev/null; then
  update
  apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
incus --version
chromium --version 2>/dev/null | head -1
