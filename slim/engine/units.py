"""A unit of work: one command of the pipeline, with what it needs to run anywhere, and the plan files that hold them.

A plan file holds one wave (units that may all run at once), one unit per line as JSON:

    {"label": "sweep slim kappa=10", "argv": ["python", "ot_edit_layer.py", ...], "cwd": "/repo",
     "env": {"OMP_NUM_THREADS": "1"}, "gpus": 1, "cpus": 0}

This module imports only the standard library: scripts/engine.sh runs it as a file (`python units.py add ...`),
which takes milliseconds, where `python -m slim.engine` imports the whole package first.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PlanError",
    "Unit",
    "check_wave",
    "read_plan",
    "write_plan",
    "append_unit",
    "unit_env",
    "log_name",
    "ENV_NAMES",
]

# The variables a unit carries to the Ray workers (locally the workers inherit the caller's whole environment; on a
# cluster they have their own, plus these): the scripts' settings, the package's own and the libraries' that change
# what a command computes or where it finds files. Secrets are left out (the plan file is on disk): a worker reads
# them from its own environment; ENGINE_ENV="NAME ..." adds names on purpose.
ENV_NAMES = (
    "MODEL MODELS METHOD FULL NUM_FOLD N_QUESTIONS MAX_QUESTIONS SWEEP_Q KAPPAS ALPHAS STRENGTHS CRITERION "
    "MAX_DEGENERACY BL GAMMA NUM_HEADS FIGURE_BLS OUT_DIR PAPER_DIR ROWS_OUT NQ_FILE NQ_QUESTIONS README JUDGES "
    "OMP_NUM_THREADS MKL_NUM_THREADS TOKENIZERS_PARALLELISM PYTHONHASHSEED PYTHONUNBUFFERED OPENAI_BASE_URL"
).split()
ENV_PREFIXES = ("SLIM_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")
_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


class PlanError(ValueError):
    """A plan file or unit that cannot run: one line naming the file, the line and what is wrong."""


@dataclass
class Unit:
    """One command: `argv` run in `cwd` with `env` on top of the worker's environment. `gpus` 1: one GPU where the
    cluster has GPUs (0: never); `cpus`: its threads (0: the engine gives it its share of the node)."""

    label: str
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 1
    cpus: int = 0

    def to_json(self) -> str:
        """The unit as one line of JSON (no newline)."""
        record = {"label": self.label, "argv": self.argv, "cwd": self.cwd, "env": self.env}
        return json.dumps({**record, "gpus": self.gpus, "cpus": self.cpus}, ensure_ascii=True)

    @classmethod
    def from_record(cls, record, where: str = "unit") -> Unit:
        """A unit from a decoded JSON object, checked; `where` names it in the one-line PlanError."""
        if not isinstance(record, dict):
            raise PlanError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        unknown = sorted(set(record) - {"label", "argv", "cwd", "env", "gpus", "cpus"})
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {', '.join(unknown)} (fields: label argv cwd env gpus cpus).")
        label, argv, cwd = record.get("label"), record.get("argv"), record.get("cwd")
        env, gpus, cpus = record.get("env", {}), record.get("gpus", 1), record.get("cpus", 0)
        if not isinstance(label, str) or not label.strip() or "\n" in label:
            raise PlanError(f"{where}: label must be a non-empty one-line string, got {label!r}.")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise PlanError(f"{where} ({label}): argv must be a non-empty list of strings, got {argv!r}.")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise PlanError(f"{where} ({label}): cwd must be an absolute path, got {cwd!r}.")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise PlanError(f"{where} ({label}): env must map names to strings, got {env!r}.")
        if gpus not in (0, 1) or isinstance(gpus, bool):
            raise PlanError(f"{where} ({label}): gpus must be 0 or 1, got {gpus!r}.")
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 0:
            raise PlanError(f"{where} ({label}): cpus must be a whole number >= 0 (0: the node's share), got {cpus!r}.")
        return cls(label, list(argv), cwd, dict(env), gpus, cpus)


def log_name(label: str) -> str:
    """The file name of a unit's log: its label with anything but letters, digits and `.=-` as `_`."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_.")[:120] + ".log"


def check_wave(units: list[Unit], where: str = "plan") -> list[Unit]:
    """`units`, after checking that no two share a log file (their labels name the logs)."""
    seen: dict[str, str] = {}
    for unit in units:
        name = log_name(unit.label)
        if name in seen:
            raise PlanError(
                f"{where}: units '{seen[name]}' and '{unit.label}' share the log {name}: give them distinct labels."
            )
        seen[name] = unit.label
    return units


def read_plan(path: str | os.PathLike) -> list[Unit]:
    """The units of a plan file, in order; blank lines are skipped. Bad lines: a PlanError naming the line."""
    path = Path(path)
    try:
        # surrogateescape: arguments that are not UTF-8 (odd file names) come back byte for byte
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file.") from None
    units = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlanError(f"{path} line {n}: not JSON ({err.msg} at column {err.colno}).") from None
        units.append(Unit.from_record(record, f"{path} line {n}"))
    return check_wave(units, str(path))


def write_plan(path: str | os.PathLike, units: list[Unit]) -> None:
    """Write `units` as a plan file (replacing it)."""
    Path(path).write_text("".join(u.to_json() + "\n" for u in units), encoding="utf-8", errors="surrogateescape")


def append_unit(path: str | os.PathLike, unit: Unit) -> None:
    """Add one unit to a plan file (one line, one write)."""
    with open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
        f.write(unit.to_json() + "\n")


def unit_env(environ: dict[str, str]) -> dict[str, str]:
    """The variables of `environ` a unit carries (ENV_NAMES, ENV_PREFIXES without secrets, and ENGINE_ENV's)."""
    extra = environ.get("ENGINE_ENV", "").split()
    return {
        k: v
        for k, v in sorted(environ.items())
        if k in extra or k in ENV_NAMES or (k.startswith(ENV_PREFIXES) and not _SECRET.search(k))
    }


def _add(args: list[str]) -> int:
    """`add PLAN LABEL GPUS CPUS -- ARGV...` (scripts/engine.sh): the unit, with this process's cwd and variables."""
    if len(args) < 6 or args[4] != "--":
        print("error: usage: units.py add PLAN LABEL GPUS CPUS -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    plan, label, gpus, cpus, argv = args[0], args[1], args[2], args[3], args[5:]
    try:
        if not (gpus.isdigit() and cpus.isdigit()):
            raise PlanError(f"unit '{label}': --gpus takes 0 or 1, --cpus a whole number; got '{gpus}', '{cpus}'.")
        record = {"label": label, "argv": argv, "cwd": os.getcwd(), "env": unit_env(dict(os.environ))}
        unit = Unit.from_record({**record, "gpus": int(gpus), "cpus": int(cpus)}, f"unit '{label}'")
    except PlanError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    append_unit(plan, unit)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["add"]:
        sys.exit(_add(sys.argv[2:]))
    print("error: usage: units.py add PLAN LABEL GPUS CPUS -- COMMAND [ARGS...]", file=sys.stderr)
    sys.exit(2)
