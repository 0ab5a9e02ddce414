#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, run the linters, then the tests.
#   ./scripts/test.sh              ruff, mypy and the whole suite (two pytest workers)
#   ./scripts/test.sh -k volume    pytest arguments pass through (-n 0: one process)
#   ./scripts/test.sh -m "not slow"  the fast lane (a few minutes)
# Any linter finding fails the run before a test starts. PYTEST_WORKERS sets the number of
# pytest-xdist workers (default 2: this suite's services and model tests fit two cores).
# As root (CI) it also installs the Debian tools the offline validators and PACS tests use
# and starts PostgreSQL and Redis when they are down. Elsewhere those tests skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ "$(id -u)" = 0 ]; then
  need=()
  command -v docker-compose >/dev/null || need+=(docker-compose)
  command -v Orthanc >/dev/null || need+=(orthanc orthanc-dicomweb)
  command -v dciodvfy >/dev/null || need+=(dicom3tools)  # validates the SR, SEG and overlay objects
  if [ ${#need[@]} -gt 0 ]; then
    # policy-rc.d keeps the packages from starting system services: the tests start their own
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[cpu,test,pacs,fast]'

echo "ruff check" && .venv/bin/ruff check --quiet .
echo "ruff format --check" && .venv/bin/ruff format --check --quiet .
echo "mypy (strict)" && .venv/bin/mypy
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup "$@"
