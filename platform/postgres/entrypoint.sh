#!/bin/sh
# First start: create the cluster in the (volume) data directory, the
# application user (not a superuser) and database. The superuser
# `postgres` has its own password; secrets reach psql through its
# environment (`\getenv`), never its command line. A data directory made
# before the superuser had its own password is brought to this state once
# (marker file). Then the server runs in the foreground.
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:?}" "${POSTGRES_SUPERUSER_PASSWORD:?}"
marker="$PGDATA/.mlops-superuser-password"
# The socket lives in $PGHOST (/tmp, a tmpfs: the root filesystem is
# read-only); psql finds it through the same variable.
sockets="-c unix_socket_directories=${PGHOST:-/tmp}"
local_start() { pg_ctl -D "$PGDATA" -o "-c listen_addresses='' $sockets" -w start >/dev/null; }
local_stop() { pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  umask 077
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_SUPERUSER_PASSWORD" > "$pwfile"
  initdb --username=postgres --pwfile="$pwfile" --auth-local=peer --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  local_start
  psql -v ON_ERROR_STOP=1 --username=postgres -d postgres -v user="$POSTGRES_USER" -v db="$POSTGRES_DB" <<'SQL'
\getenv pass POSTGRES_PASSWORD
CREATE ROLE :"user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'pass';
CREATE DATABASE :"db" OWNER :"user";
SQL
  local_stop
  touch "$marker"
elif [ ! -e "$marker" ]; then
  local_start
  psql -v ON_ERROR_STOP=1 --username=postgres -d postgres -v user="$POSTGRES_USER" <<'SQL'
\getenv su POSTGRES_SUPERUSER_PASSWORD
ALTER ROLE postgres PASSWORD :'su';
ALTER ROLE :"user" NOSUPERUSER;
SQL
  local_stop
  touch "$marker"
fi
# The server and its backends need neither password.
unset POSTGRES_PASSWORD POSTGRES_SUPERUSER_PASSWORD
# shellcheck disable=SC2086
exec postgres -D "$PGDATA" -c listen_addresses='*' $sockets
