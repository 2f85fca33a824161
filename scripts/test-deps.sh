#!/usr/bin/env bash
# Make sure the external servers the test suite starts are installed: a real etcd and etcdctl
# (the oracle of the differential tests), PostgreSQL's initdb/pg_ctl, MariaDB's mariadbd and
# mariadb-install-db, faketime (an instance whose clock is off) and systemd's offline tools. As
# root, installs what is missing from Debian's packages; otherwise says what to install.
set -euo pipefail

missing=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || [ -x /usr/bin/etcdctl ] || missing+=(etcd-client)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)
# systemd-analyze verify/security and systemd-sysusers check deploy/systemd/ offline.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
  missing+=(mariadb-server)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "test-deps: missing ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
