#!/bin/sh
# Create one role and one database per service, named and with the password of the URL that
# service uses (DATABASE_URL_<SERVICE>, from Secret p2pgrid-secrets): one source of truth.
# Runs once, when the data folder is first initialised.
set -eu
for service in METER_INGEST ORDER_BOOK GRID_CHECK LEDGER; do
    url=$(printenv "DATABASE_URL_${service}")
    # postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE[?OPTIONS]
    user=$(printf '%s' "$url" | sed -E 's#^[^:]+://([^:@/]+):.*$#\1#')
    password=$(printf '%s' "$url" | sed -E 's#^[^:]+://[^:@/]+:([^@]*)@.*$#\1#')
    database=$(printf '%s' "$url" | sed -E 's#^[^:]+://[^/]+/([^?]+).*$#\1#')
    if [ -z "$user" ] || [ "$user" = "$url" ] || [ "$password" = "$url" ] || [ "$database" = "$url" ]; then
        echo "postgres-init: database_url for ${service} is not postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE" >&2
        exit 1
    fi
    psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
        -v role="$user" -v password="$password" -v database="$database" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"database" OWNER :"role";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
SQL
    echo "postgres-init: created role and database for ${service}"
done
