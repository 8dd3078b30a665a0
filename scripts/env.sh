# Which Python environment the project's shell scripts use; sourced, not run:
#   . scripts/env.sh && slim_use_env     (run_pipeline.sh, sweep.sh, reproduce.sh, test.sh, benchmarks/*.sh, .ci/run)
#   . scripts/env.sh                     (install.sh: the functions only)
#
# The rule, the same as install.sh's:
#   - an active virtual or conda environment (VIRTUAL_ENV or CONDA_PREFIX set) is used as it is;
#   - otherwise the repository's .venv, made by install.sh, once an install into it has finished: its bin/ goes first
#     on PATH (and VIRTUAL_ENV names it, so scripts started from here see the same environment);
#   - a .venv whose install did not finish (interrupted, or failed) stops the script with one line saying so;
#   - with neither, the python on PATH runs, as before .venv existed.
# install.sh marks .venv with .slim-installing while it installs and .slim-installed when it has finished.
# shellcheck shell=bash

SLIM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SLIM_VENV=$SLIM_ROOT/.venv

slim_env_active() { # an environment of the user's own is active
  [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]
}

slim_venv_state() { # none | complete | incomplete | foreign (a .venv that install.sh did not make)
  if [ ! -e "$SLIM_VENV" ]; then
    echo none
  elif [ -e "$SLIM_VENV/.slim-installing" ]; then
    echo incomplete
  elif [ -e "$SLIM_VENV/.slim-installed" ]; then
    if [ -x "$SLIM_VENV/bin/python" ]; then echo complete; else echo incomplete; fi
  else
    echo foreign
  fi
}

slim_use_env() {
  slim_env_active && return 0
  case $(slim_venv_state) in
    complete)
      export VIRTUAL_ENV=$SLIM_VENV PATH="$SLIM_VENV/bin:$PATH"
      unset PYTHONHOME
      ;;
    incomplete)
      echo "$(basename "$0"): $SLIM_VENV is incomplete (its install did not finish): run bash install.sh again" >&2
      return 1
      ;;
  esac
  return 0
}
