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
  ensure_transcoder
}

# Builds the compiled record-batch transcoder (transcoder/, Rust through maturin) into the venv
# when it is missing or its sources changed since the last build (about 90 s from scratch).
# Its wheel is the extension module alone (`kafka_sidecar_transcoder_native`); the package
# itself (transcoder/python) comes with the editable install above, so Python changes there need
# no rebuild. The import check catches a venv whose build went missing under a fresh stamp.
ensure_transcoder() {
  local stamp=$VENV/.transcoder-built
  if [[ -f $stamp ]] \
    && [[ -z $(find transcoder -path transcoder/target -prune -o -path transcoder/python -prune \
      -o -newer "$stamp" -type f -print) ]] \
    && "$VENV/bin/python" -c 'import kafka_sidecar_transcoder_native' 2>/dev/null; then
    return
  fi
  command -v cargo >/dev/null || { echo "cargo not found (Rust is needed for transcoder/)" >&2; exit 1; }
  echo "building the transcoder (transcoder/)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check ./transcoder
  touch "$stamp"
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

# The test beds of scripts/local-kafka: one broker, or three. Tests need one or the other, and
# both take port 19092, so scripts/test swaps them. bed_running prints the count of the bed
# that runs, if all of it runs.
bed_running() {
  scripts/local-kafka status >/dev/null 2>&1 || return 1
  scripts/local-kafka env | sed -n 's/^export KAFKA_BROKERS=//p'
}

# use_bed N: makes the N-broker bed the one that runs. The first call notes the bed that ran
# before (restore_bed brings it back at exit, or stops what was started).
use_bed() {
  local now
  now=$(bed_running) || now=""
  if [[ -z ${BED_BEFORE+set} ]]; then
    BED_BEFORE=$now
    trap restore_bed EXIT
  fi
  [[ $now == "$1" ]] && return
  scripts/local-kafka stop
  LOCAL_KAFKA_BROKERS=$1 scripts/local-kafka start
}

restore_bed() {
  local now
  now=$(bed_running) || now=""
  [[ $now == "$BED_BEFORE" ]] && return
  scripts/local-kafka stop
  if [[ -n $BED_BEFORE ]]; then LOCAL_KAFKA_BROKERS=$BED_BEFORE scripts/local-kafka start; fi
}
