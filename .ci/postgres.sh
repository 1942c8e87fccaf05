#!/usr/bin/env bash
# Install Debian's PostgreSQL server, start it on 127.0.0.1, create a test role and database,
# and publish the SQLAlchemy URL the ledger tests read from EVOLUTION_TEST_PG_URL.
#
# Run it (as root, Debian 12, apt reachable):   bash .ci/postgres.sh
#   -> prints the URL and writes it to $EVOLUTION_PG_URL_FILE (default /tmp/evolution_test_pg_url)
# or source it to also get the variable exported: . .ci/postgres.sh
#
# Idempotent: an installed package, an existing cluster, role or database is reused.
# Knobs (env): EVOLUTION_PG_USER, EVOLUTION_PG_PASSWORD, EVOLUTION_PG_DB, EVOLUTION_PG_URL_FILE.

_evolution_pg_setup() (
    set -euo pipefail
    local user="${EVOLUTION_PG_USER:-evolution}"
    local password="${EVOLUTION_PG_PASSWORD:-evolution}"
    local db="${EVOLUTION_PG_DB:-evolution_test}"
    local url_file="${EVOLUTION_PG_URL_FILE:-/tmp/evolution_test_pg_url}"

    if [ "$(id -u)" -ne 0 ]; then
        echo "postgres.sh: run as root (it installs packages and starts the server)" >&2
        exit 1
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
        echo "postgres.sh: installing postgresql from Debian" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # the package's own cluster is created by postinst; policy-rc.d may forbid starting it here
        apt-get install -y -qq postgresql >/dev/null
    fi

    local version
    version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
    if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
        pg_createcluster "$version" main >/dev/null
    fi
    # a drop-in (Debian's postgresql.conf includes conf.d/) rather than editing the main file
    local confd="/etc/postgresql/$version/main/conf.d"
    mkdir -p "$confd"
    local want="listen_addresses = '127.0.0.1'"
    local changed=0
    if [ "$(cat "$confd/evolution-ci.conf" 2>/dev/null)" != "$want" ]; then
        printf '%s\n' "$want" >"$confd/evolution-ci.conf"
        changed=1
    fi
    local port
    port="$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')"

    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
        pg_ctlcluster "$version" main start
    elif [ "$changed" -eq 1 ]; then
        pg_ctlcluster "$version" main restart
    fi
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.5
    done
    pg_isready -h 127.0.0.1 -p "$port" >&2

    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -p "$port" \
        -v user="$user" -v password="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'password')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'user', :'password') \gexec
SQL
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -p "$port" -v user="$user" -v db="$db" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL

    local url="postgresql+psycopg://${user}:${password}@127.0.0.1:${port}/${db}"
    PGPASSWORD="$password" psql -q -h 127.0.0.1 -p "$port" -U "$user" -d "$db" -c "SELECT 1" >/dev/null
    printf '%s\n' "$url" >"$url_file"
    echo "EVOLUTION_TEST_PG_URL=$url"
)

# Not called from an `if`: bash ignores `set -e` inside a function used as a condition.
_evolution_pg_setup
_evolution_pg_rc=$?
if [ "$_evolution_pg_rc" -eq 0 ]; then
    EVOLUTION_TEST_PG_URL="$(cat "${EVOLUTION_PG_URL_FILE:-/tmp/evolution_test_pg_url}")"
    export EVOLUTION_TEST_PG_URL
else
    echo "postgres.sh: PostgreSQL setup failed (exit $_evolution_pg_rc)" >&2
fi
(return 0 2>/dev/null) && return "$_evolution_pg_rc" || exit "$_evolution_pg_rc"
