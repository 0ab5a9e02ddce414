#!/usr/bin/env bash
# Offline validation of docker-compose.yml and deploy/k8s: no Docker engine, no cluster.
#
#   scripts/validate-deploy.sh                      # lint, compose config, schemas, consistency
#   scripts/validate-deploy.sh render gpu-cluster   # print an overlay's manifests (kustomize subset)
#
# The same checks run in the test suite (tests/deploy); this is the quick loop while
# editing manifests. `kubectl kustomize deploy/k8s/overlays/NAME` renders with the real
# kustomize where kubectl is at hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if [ "${1:-}" = "render" ]; then
    exec "$PY" -m tests.deploy.checks render "${2:?usage: $0 render OVERLAY}"
fi

"$PY" -m yamllint --strict -c deploy/yamllint.yaml docker-compose.yml deploy/
if command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f docker-compose.yml config -q
elif docker compose version >/dev/null 2>&1; then
    docker compose -f docker-compose.yml config -q
else
    echo "validate-deploy: no docker-compose binary; the Compose schema check below still runs" >&2
fi
"$PY" -m tests.deploy.checks
