#!/bin/sh
# Entry point of the tensafe-postgres image: initdb on the first start, then postgres in the foreground.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pw=${POSTGRES_PASSWORD:-}
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then pw=$(cat "$POSTGRES_PASSWORD_FILE"); fi
    [ -n "$pw" ] || { echo "set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE" >&2; exit 2; }
    umask 077
    printf '%s\n' "$pw" > /tmp/pwfile
    initdb -D "$PGDATA" --username=tensafe --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C >/dev/null
    rm -f /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE tensafe OWNER tensafe;" | postgres --single -D "$PGDATA" postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
