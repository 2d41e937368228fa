# Sourced by hack/control-plane and hack/node: the daemons they start, recorded so that a PID
# file left by an earlier boot or session (its PID since reused) never names another process.
# FILE.pid holds the PID, FILE.started the process's start time (clock ticks after boot).

# The start time of process PID, from /proc/PID/stat (its 22nd field; the name, the 2nd, may
# hold spaces, so fields are counted after its closing parenthesis).
started_at() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # shellcheck disable=SC2086 # split into fields on purpose
  set -- $stat
  echo "${20}"
}

# Records PID in FILE (a .pid path).
record_pid() {
  echo "$2" >"$1"
  started_at "$2" >"${1%.pid}.started" || rm -f "${1%.pid}.started"
}

# Whether the process FILE names still runs: the same PID, started at the same time. A PID
# file of the scripts before start times were kept has no FILE.started: its process counts
# when its program is COMMAND, so that `down` still stops it.
recorded_alive() {
  local pid started program=
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  if [ ! -f "${1%.pid}.started" ]; then
    read -r -d '' program <"/proc/$pid/cmdline" 2>/dev/null || true
    [ -n "${2:-}" ] && [ "${program##*/}" = "$2" ]
    return
  fi
  started=$(started_at "$pid") || return 1
  [ "$started" = "$(cat "${1%.pid}.started")" ]
}

# Stops the process FILE names (SIGTERM, then SIGKILL after ten seconds), if it still runs
# (COMMAND as for recorded_alive), and forgets it.
stop_recorded() {
  local pid
  if recorded_alive "$1" "${2:-}"; then
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1" "${1%.pid}.started"
}
