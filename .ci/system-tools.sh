#!/usr/bin/env bash
# Install the system tools two kinds of tests need, and check they work here:
#  - systemd-analyze (Debian's systemd package) for tests/test_ops.py's `systemd-analyze verify` of the unit;
#  - mount / umount (util-linux's mount package) for the reliability suite's size-limited tmpfs disks,
#    which also need root: this script mounts and unmounts a 1 MiB tmpfs to prove the machine allows it.
#
# Run it (as root, Debian 12, apt reachable):   bash .ci/system-tools.sh
# Idempotent: installed tools are kept. Exits non-zero, saying why, when a tool cannot work here.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "system-tools.sh: run as root (it installs packages and mounts a tmpfs)" >&2
    exit 1
fi
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
{ command -v mount >/dev/null 2>&1 && command -v umount >/dev/null 2>&1; } || missing+=(mount)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "system-tools.sh: installing ${missing[*]} from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

probe="$(mktemp -d)"
if ! mount -t tmpfs -o size=1m tmpfs "$probe"; then
    rmdir "$probe"
    echo "system-tools.sh: this machine refuses \`mount -t tmpfs\` even to root (a container without" \
         "CAP_SYS_ADMIN?); the disk-full tests need it" >&2
    exit 1
fi
umount "$probe"
rmdir "$probe"
systemd-analyze --version | head -n 1
