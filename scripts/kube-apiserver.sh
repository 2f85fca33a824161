#!/usr/bin/env bash
# Print the path of a kube-apiserver binary, building it first if it is not cached.
#
#   scripts/kube-apiserver.sh            # -> $KINE_CACHE_DIR/kube-apiserver-v1.20.2
#
# The binary is built from Debian 12's own `kubernetes` source package (Kubernetes 1.20.x, with
# its vendor/ tree), so the build needs nothing beyond Debian's package mirror: a deb-src entry is
# added next to the existing bookworm one, golang-go/rsync/make/dpkg-dev are installed, and
# `make WHAT=cmd/kube-apiserver` runs in GOPATH mode exactly as the package's debian/rules does.
# Needs root (or sudo) for apt-get; about 5-10 minutes on 2 cores, then instant.
#
# Environment:
#   KINE_CACHE_DIR          cache directory (default ~/.cache/kine-server)
#   KUBE_APISERVER_VERSION  the version the Debian source package must build (default v1.20.2,
#                           what bookworm's 1.20.5+really1.20.2 package contains)
#
# Quiet on success: only the path goes to stdout. The build log is $CACHE/kube-apiserver-build.log;
# on failure its tail goes to stderr and the exit code is non-zero.
set -Eeuo pipefail

CACHE=${KINE_CACHE_DIR:-$HOME/.cache/kine-server}
VERSION=${KUBE_APISERVER_VERSION:-v1.20.2}
BIN=$CACHE/kube-apiserver-$VERSION
LOG=$CACHE/kube-apiserver-build.log
SRC_LIST=/etc/apt/sources.list.d/kine-src.list

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$CACHE"
: >"$LOG"
WORK=$(mktemp -d "$CACHE/kube-apiserver-build.XXXXXX")
cleanup() { rm -rf "$WORK"; }
fail() {
  echo "kube-apiserver.sh: $*" >&2
  echo "--- last lines of $LOG ---" >&2
  tail -n 40 "$LOG" >&2 || true
  exit 1
}
trap cleanup EXIT
trap 'fail "command failed (line $LINENO)"' ERR

log() { echo "+++ [$(date +%T)] $*" >>"$LOG"; }

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  SUDO=()
fi
apt_get() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >>"$LOG" 2>&1; }

# The URI (and keyring) of the existing bookworm entry: deb822 files first (Debian 12's default
# /etc/apt/sources.list.d/debian.sources), then one-line lists. Prints "URI<TAB>SIGNED_BY".
bookworm_source() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk '
      function flush() {
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && suites ~ /(^|[ \t])bookworm([ \t]|$)/ && uris != "" && !done) {
          split(uris, u, /[ \t]+/); print u[1] "\t" signed; done = 1
        }
        types = ""; suites = ""; uris = ""; signed = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[Tt]ypes:/    { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
      /^[Ss]uites:/   { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
      /^URIs:/        { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
      /^[Ss]igned-[Bb]y:/ { sub(/^[^:]*:[ \t]*/, ""); signed = $0 }
      END { flush() }
    ' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] && [ "$f" != "$SRC_LIST" ] || continue
    awk '
      $1 == "deb" {
        opts = ""; i = 2
        if ($2 ~ /^\[/) { while ($i !~ /\]$/) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
        if ($(i + 1) == "bookworm") {
          signed = ""
          if (match(opts, /signed-by=[^] ]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
          print $i "\t" signed; exit
        }
      }' "$f"
  done
}

# 1. A deb-src entry for bookworm main, on the same mirror as the existing bookworm entry.
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  src=$(bookworm_source | head -n 1)
  uri=${src%%$'\t'*}
  signed=${src#*$'\t'}
  [ -n "$uri" ] || fail "no 'deb … bookworm' entry found in /etc/apt/sources.list{,.d}"
  if [ -n "$signed" ]; then
    line="deb-src [signed-by=$signed] $uri bookworm main"
  else
    line="deb-src $uri bookworm main"
  fi
  log "adding $SRC_LIST: $line"
  echo "$line" | "${SUDO[@]}" tee "$SRC_LIST" >/dev/null
  log "apt-get update"
  apt_get update
fi

# 2. Build tools.
log "apt-get install golang-go rsync make dpkg-dev"
apt_get install -y golang-go rsync make dpkg-dev

# 3. The source package (it includes vendor/), unpacked with Debian's patches applied.
log "apt-get source kubernetes"
(cd "$WORK" && apt-get source kubernetes) >>"$LOG" 2>&1
TREE=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
[ -n "$TREE" ] || fail "apt-get source kubernetes unpacked no kubernetes-* directory"

# 4. Build as debian/rules does: GOPATH mode (hack/lib/init.sh sets GO111MODULE=off and builds
#    from vendor/), the tree reachable as $GOPATH/src/k8s.io/kubernetes, static binary.
log "make WHAT=cmd/kube-apiserver in $TREE"
mkdir -p "$TREE/.go/src/k8s.io" "$WORK/home"
ln -sfn ../../.. "$TREE/.go/src/k8s.io/kubernetes"
(
  cd "$TREE"
  export GOPATH="$TREE/.go" CGO_ENABLED=0 HOME="$WORK/home" GOCACHE="$WORK/go-build"
  export PATH="/usr/lib/go/bin:$PATH"
  unset GOFLAGS GO111MODULE
  time make WHAT=cmd/kube-apiserver
) >>"$LOG" 2>&1

built="$TREE/_output/bin/kube-apiserver"
[ -x "$built" ] || fail "the build produced no $built"
got=$("$built" --version 2>>"$LOG")
log "built: $got"
[ "$got" = "Kubernetes $VERSION" ] ||
  fail "the source package builds '$got', not Kubernetes $VERSION; set KUBE_APISERVER_VERSION=${got#Kubernetes }"

install -m 0755 "$built" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
log "cached $BIN"
echo "$BIN"
