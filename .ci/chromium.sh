#!/usr/bin/env bash
# Install Debian's Chromium for the dashboard's browser tests (tests/test_dashboard.py drives it with
# Playwright through executable_path; Playwright's own browser download is never used).
#
# Run it (as root, Debian 12, apt reachable):   bash .ci/chromium.sh
# Idempotent: an installed chromium is kept. Prints the path of the executable.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "chromium.sh: run as root (it installs the chromium package)" >&2
        exit 1
    fi
    echo "chromium.sh: installing chromium from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
fi
command -v chromium
