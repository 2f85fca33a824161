#!/usr/bin/env bash
# Make podman ready to build and run kine-server's image on a Debian 12 machine with no container
# registry in reach, as root. Idempotent; prints the containers.conf to use on stdout:
#
#   export CONTAINERS_CONF=$(scripts/podman-setup.sh)
#   podman build --pull=never --format docker -t kine-server .
#
# 1. Debian's podman, runc, debootstrap, netavark/aardvark-dns and iptables, when missing.
# 2. A containers.conf (nothing is written to /etc) for what such a machine lacks:
#    - runc, not crun: Debian 12's crun 1.8 refuses a hybrid cgroup v1/v2 layout;
#    - cgroupfs and a file event log: systemd is not PID 1 here (CI, containers, VMs);
#    - netavark, not the CNI plugins Debian's podman leaves a config for but does not install;
#    - default ulimits at the hard limits: root without CAP_SYS_RESOURCE cannot raise them to
#      podman's defaults, and every container start fails with setrlimit EPERM otherwise
#      (nproc at most 32768: podman 4.3 lowers its own to that as it starts).
# 3. The base image, debian:bookworm-slim, made locally when no registry has it for us:
#    debootstrap --variant=minbase bookworm, then what Debian's slim image does on top (no docs,
#    man pages or locales; bookworm-updates and bookworm-security as apt sources), imported under
#    that name. The tar is cached for a week in $KINE_CACHE_DIR (default ~/.cache/kine-server).
#
# Environment: KINE_CACHE_DIR, DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -Eeuo pipefail

CACHE=${KINE_CACHE_DIR:-$HOME/.cache/kine-server}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=docker.io/library/debian:bookworm-slim
BASE_TAR=$CACHE/debian-bookworm-slim.tar
CONF=$CACHE/podman/containers.conf

say() { echo "podman-setup: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "run as root (the image tests run rootful podman: bind mounts owned by uid 10001)"
  exit 1
fi

missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap netavark:/usr/lib/podman/netavark \
  aardvark-dns:/usr/lib/podman/aardvark-dns iptables:iptables; do
  package=${tool%%:*} command=${tool#*:}
  command -v "$command" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # runc named explicitly so that apt does not pick crun for podman's "crun | runc".
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then
  nproc=32768
fi
mkdir -p "$(dirname "$CONF")"
cat >"$CONF.new" <<EOF
# Written by kine-server's scripts/podman-setup.sh for this machine; see the comments there.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
EOF
mv "$CONF.new" "$CONF"
export CONTAINERS_CONF=$CONF

# In a subshell: its EXIT trap cleans up whichever way it ends.
make_base_tar() (
  root=$(mktemp -d "$CACHE/debootstrap.XXXXXX")
  # debootstrap mounts /proc and /sys inside the new root while it runs: never rm -rf through
  # a mount that a failure left behind.
  cleanup_root() {
    local mount
    for mount in $(awk -v r="$root" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
      umount -l "$mount" || true
    done
    if awk -v r="$root" 'index($2, r) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
      say "mounts left under $root: not removing it"
    else
      rm -rf "$root"
    fi
  }
  trap cleanup_root EXIT
  say "debootstrap --variant=minbase bookworm from $MIRROR (about a minute)"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
    tail -n 20 "$CACHE/debootstrap.log" >&2
    exit 1
  }
  # What Debian's slim image leaves out, for every package installed later too.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
  tar --numeric-owner --xattrs -C "$root" -cf "$BASE_TAR.new" .
  mv "$BASE_TAR.new" "$BASE_TAR"
)

if ! podman image exists "$BASE"; then
  if [ -z "$(find "$BASE_TAR" -mtime -7 2>/dev/null)" ]; then
    make_base_tar
  fi
  podman import --change 'CMD ["bash"]' "$BASE_TAR" "$BASE" >/dev/null
  say "imported $BASE from $BASE_TAR"
fi

echo "$CONF"
