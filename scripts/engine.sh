# Units of work for the shell scripts, run one after another (default) or as Ray tasks (#25); sourced, not run:
#   . scripts/engine.sh                                  (after scripts/env.sh; stops the script on a bad ENGINE)
#   unit LABEL [--gpus 0|1] [--cpus N] -- COMMAND [ARGS...]
#   wait_units
#
# ENGINE unset or sequential: `unit` runs COMMAND at once, in the foreground, exactly as the line would without
# `unit LABEL --` (same output, same exit status, `set -e` as before); wait_units does nothing.
# ENGINE=ray: `unit` adds COMMAND, with the current folder and the variables it needs (slim/engine/units.py,
# unit_env: the scripts' settings, SLIM_*, HF_*, TRANSFORMERS_*, the thread counts; ENGINE_ENV="NAME ..." adds
# others), to the current wave; wait_units runs the wave's units as Ray tasks, at once within the resources
# (python -m slim.engine run), and stops the script if one fails. A wave is what may run at once: call wait_units
# before anything reads what its units write. COMMAND must be a program (not a shell function) under ray.
#   --gpus 1 (default): one GPU where the cluster has GPUs; --gpus 0: never (tables, reports).
#   --cpus N: the command's threads (default: its share of the node's CPUs).
# ENGINE_WORKERS caps the tasks at once; ENGINE_LOGS names the logs folder (default $OUT_DIR/logs/engine, one log per
# label); RAY_ADDRESS runs on that cluster (default: a Ray started for each wave on this machine).
# shellcheck shell=bash

_ENGINE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_ENGINE_WAVE=""  # the current wave's plan file (ray), made by its first unit
_ENGINE_MODE=${ENGINE:-sequential}  # fixed when sourced (checked below)

case $_ENGINE_MODE in
  sequential) ;;
  ray)  # before anything runs: is Ray installed where the commands run?
    if ! python -c 'import importlib.util as u, sys
try:
    sys.exit(u.find_spec("ray") is None)
except Exception:
    sys.exit(1)' 2>/dev/null; then
      echo "error: ENGINE=ray needs Ray, which $(command -v python) does not have: pip install -e '.[ray]' (or bash install.sh --dev)." >&2
      return 2
    fi
    ;;
  *)
    echo "error: ENGINE must be sequential or ray, got '$ENGINE'." >&2
    return 2
    ;;
esac

unit() {  # unit LABEL [--gpus 0|1] [--cpus N] -- COMMAND [ARGS...]
  local _unit_label=${1:-} _unit_gpus=1 _unit_cpus=0
  shift || true
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    case $1 in
      --gpus) _unit_gpus=${2:-}; shift 2 || shift ;;
      --cpus) _unit_cpus=${2:-}; shift 2 || shift ;;
      *) echo "error: unit '$_unit_label': unknown option '$1' (use --gpus 0|1, --cpus N, then -- COMMAND)." >&2; exit 2 ;;
    esac
  done
  if [ -z "$_unit_label" ] || [ $# -lt 2 ]; then
    echo "error: unit '$_unit_label': usage: unit LABEL [--gpus 0|1] [--cpus N] -- COMMAND [ARGS...]" >&2
    exit 2
  fi
  shift  # the --
  if [ "$_ENGINE_MODE" != ray ]; then
    "$@"
    return
  fi
  if [ "$(type -t "$1")" != file ]; then
    echo "error: unit '$_unit_label': '$1' is $(type -t "$1" || echo 'not found'), not a program: under ENGINE=ray a unit runs a program." >&2
    exit 2
  fi
  [ -n "$_ENGINE_WAVE" ] || _ENGINE_WAVE=$(mktemp "${TMPDIR:-/tmp}/slim-wave.XXXXXX")
  python "$_ENGINE_ROOT/slim/engine/units.py" add "$_ENGINE_WAVE" "$_unit_label" "$_unit_gpus" "$_unit_cpus" -- "$@" ||
    exit 2
}

wait_units() {  # run the current wave (ray); stop the script when it fails
  [ "$_ENGINE_MODE" = ray ] && [ -n "$_ENGINE_WAVE" ] || return 0
  local _wave=$_ENGINE_WAVE _status=0
  _ENGINE_WAVE=""
  local _workers=(); [ -n "${ENGINE_WORKERS:-}" ] && _workers=(--workers "$ENGINE_WORKERS")
  # python -m slim.engine run ..., with this checkout's slim/engine whatever the current folder, and without running
  # slim/__init__.py (the engine needs Ray and the standard library; the package's imports cost seconds and memory)
  python -c 'import sys, types; slim = types.ModuleType("slim"); slim.__path__ = [sys.argv.pop(1) + "/slim"]
sys.modules["slim"] = slim; from slim.engine.__main__ import main; sys.exit(main())' \
    "$_ENGINE_ROOT" run "$_wave" --engine ray --logs "${ENGINE_LOGS:-${OUT_DIR:-.}/logs/engine}" "${_workers[@]}" ||
    _status=$?
  rm -f "$_wave"
  [ "$_status" -eq 0 ] || exit "$_status"
}
