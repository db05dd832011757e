# Shared by scripts/test and scripts/demo (sourced, not run).

# Makes .venv (or $KAFKA_SIDECAR_VENV) and installs the project with its dev extra into it,
# and the Python client (clients/python, its own distribution) editable beside it.
ensure_venv() {
  command -v python3 >/dev/null || { echo "python3 not found (3.11+ needed)" >&2; exit 1; }
  VENV=${KAFKA_SIDECAR_VENV:-.venv}
  if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  # In one command, so the sidecar's dependency on kafka-sidecar-client resolves to the checkout.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e clients/python -e '.[dev]' 
}

# Starts the local broker unless it runs; stops it on exit only if this script started it.
ensure_broker() {
  BROKER_STARTED=0
  trap 'if ((BROKER_STARTED)); then scripts/local-kafka stop; fi' EXIT
  if ! scripts/local-kafka status >/dev/null; then
    scripts/local-kafka start
    BROKER_STARTED=1
  fi
}
