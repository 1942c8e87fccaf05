#!/usr/bin/env bash
# Run the tests root cannot run as an unprivileged user, with the checkout's virtual environment.
# They are marked `unprivileged` (pyproject.toml): root writes into read-only folders, so their check
# skips as root; here it runs. Their PostgreSQL variants are deselected (a read-only folder is a files
# matter: those variants skip everywhere, saying so).
#
# Run it (as root, Debian 12, after the install: .venv exists):   bash .ci/unprivileged.sh [pytest args]
#
# It creates the system user evolution-ci (no home, no login shell) if missing. Where that user cannot
# reach the checkout or the interpreter the venv runs (a clone under /root, a pyenv Python), it lets that
# user alone pass through those folders (an ACL entry u:evolution-ci:--x, from Debian's acl package) and
# takes the entries back on exit. The tests run with a scratch HOME and TMPDIR of the user's and nothing
# of root's environment. It fails when a selected test fails or skips, or when none is selected.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
user="${EVOLUTION_CI_USER:-evolution-ci}"
py="$repo/.venv/bin/python"

if [ "$(id -u)" -ne 0 ]; then
    echo "unprivileged.sh: run as root (it creates a user and runs the tests as that user)" >&2
    exit 1
fi
if [ ! -x "$py" ]; then
    echo "unprivileged.sh: no $py: install first (make test, or bash scripts/install.sh)" >&2
    exit 1
fi
id -u "$user" >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$user"

as_user() { runuser -u "$user" -- "$@"; }

granted=()  # "folder" (had no ACL: all of it removed again) or "+folder" (had one: only our entry removed)
work="$(mktemp -d)"
cleanup() {
    local d
    for d in "${granted[@]}"; do
        if [ "${d:0:1}" = "+" ]; then setfacl -x "u:$user" "${d:1}" || true; else setfacl -b "$d" || true; fi
    done
    rm -rf "$work"
}
trap cleanup EXIT
chown "$user" "$work"

# Every folder from / down to the checkout and to the interpreter's own folder, in order.
for target in "$repo" "$(dirname "$(readlink -f "$py")")"; do
    path=""
    IFS=/ read -ra parts <<<"${target#/}"
    for part in "${parts[@]}"; do
        path="$path/$part"
        as_user test -x "$path" && continue
        if ! command -v setfacl >/dev/null 2>&1; then
            echo "unprivileged.sh: installing acl from Debian (to let $user pass through $path)" >&2
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq acl >/dev/null
        fi
        if [ -n "$(getfacl --skip-base --absolute-names "$path" 2>/dev/null)" ]; then
            granted+=("+$path")
        else
            granted+=("$path")
        fi
        setfacl -m "u:$user:x" "$path"
    done
done
if ! as_user env -i HOME="$work" PYTHONDONTWRITEBYTECODE=1 "$py" -c "import evolution, pytest"; then
    echo "unprivileged.sh: $user cannot import the package from $repo with $py: are the checkout's files" \
         "readable by others (umask 022)?" >&2
    exit 1
fi

as_user env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work" TMPDIR="$work" LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    "$py" -m pytest -p no:cacheprovider -m unprivileged -k "not postgresql" -rs \
    --junitxml="$work/junit.xml" "$@"

"$py" - "$work/junit.xml" "$user" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
ran, skipped = int(suite.get("tests")), int(suite.get("skipped"))
if ran == 0 or skipped:
    sys.exit(f"unprivileged.sh: {ran} test(s) selected, {skipped} skipped: as {sys.argv[2]} every one must run")
print(f"unprivileged.sh: {ran} test(s) ran as {sys.argv[2]}, none skipped")
PY
