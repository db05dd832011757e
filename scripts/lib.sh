# Shared by scripts/test and scripts/demo (sourced, not run).

# Makes .venv (or $KAFKA_SIDECAR_VENV) and installs the project, editable, with its dev extra.
# That alone provides `kafkasidecar` (the generated stubs and the Python client): the sidecar's
# editable install puts clients/python/src on sys.path, and nothing named kafka-sidecar* comes
# from an index. The client's own distribution (clients/python) is for apps; installed
# editable beside it, as older venvs have it, it only adds a second .pth file for the same
# folder: neither install owns a file of the other, so removing one never breaks the other.
ensure_venv() {
  command -v python3 >/dev/null || { echo "python3 not found (3.11+ needed)" >&2; exit 1; }
  VENV=${KAFKA_SIDECAR_VENV:-.venv}
  if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
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
