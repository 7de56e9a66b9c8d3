#!/usr/bin/env bash
# Creates batchscore's roles and databases. The postgres image runs this once, from
# /docker-entrypoint-initdb.d, when its data volume is empty (see docker-compose.yaml).
#
#   batchscore  pipeline metrics and lineage; role `batchscore` may connect to this database
#               and create its own tables in schema public, nothing more.
#   metaflow    the Metaflow metadata service; role `metaflow` owns it (the service's
#               migrations and the UI backend's triggers need an owner).
#
# Passwords come from the environment (BATCHSCORE_DB_PASSWORD, METAFLOW_DB_PASSWORD) and reach
# SQL as psql variables (:'name' quotes them), never spliced into the script text.
set -euo pipefail

psql --no-psqlrc --set ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
    --set batchscore_password="${BATCHSCORE_DB_PASSWORD:?BATCHSCORE_DB_PASSWORD is not set}" \
    --set metaflow_password="${METAFLOW_DB_PASSWORD:?METAFLOW_DB_PASSWORD is not set}" <<'SQL'
CREATE ROLE batchscore LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
    PASSWORD :'batchscore_password';
CREATE DATABASE batchscore;
REVOKE ALL ON DATABASE batchscore FROM PUBLIC;
GRANT CONNECT ON DATABASE batchscore TO batchscore;

CREATE ROLE metaflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
    PASSWORD :'metaflow_password';
CREATE DATABASE metaflow OWNER metaflow;
REVOKE ALL ON DATABASE metaflow FROM PUBLIC;

\connect batchscore
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO batchscore;
SQL
