"""python -m slim.engine run PLAN [--engine ray|sequential] [--workers N] [--logs DIR]: run one wave of units.

Exit status: 0 when every unit succeeded; 2 with one `error:` line when the engine cannot run the wave or (ray) a
unit failed; a failing unit's own status under sequential (its output is already on the terminal).
"""

from __future__ import annotations

import argparse
import os
import sys

from .runner import ENGINES, UnitFailed, run_wave
from .units import read_plan


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m slim.engine", description="Run one wave of units (a plan file).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the units of a plan file (JSON lines, see slim.engine.units)")
    run.add_argument("plan", help="the plan file: one unit per line")
    run.add_argument("--engine", default=None, help=f"{' or '.join(ENGINES)}; default $ENGINE, else sequential")
    run.add_argument("--workers", type=int, default=None, help="(ray) at most N tasks at once; default $ENGINE_WORKERS")
    run.add_argument("--logs", default=None, help="(ray) the units' logs; default $ENGINE_LOGS, else logs/engine")
    args = parser.parse_args(argv)
    engine = args.engine or os.environ.get("ENGINE") or "sequential"
    try:
        workers = args.workers
        if workers is None and os.environ.get("ENGINE_WORKERS"):
            if not os.environ["ENGINE_WORKERS"].isdigit():
                raise ValueError(f"ENGINE_WORKERS must be a whole number, got '{os.environ['ENGINE_WORKERS']}'.")
            workers = int(os.environ["ENGINE_WORKERS"])
        logs = args.logs or os.environ.get("ENGINE_LOGS") or "logs/engine"
        run_wave(read_plan(args.plan), engine, workers=workers, logs_dir=logs)
    except UnitFailed as err:
        if err.message:
            print(f"error: {' '.join(err.message.split())}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print(
            "error: interrupted; the units still running were stopped, a rerun reads back what the others wrote.",
            file=sys.stderr,
        )
        return 130
    except (ValueError, RuntimeError, OSError) as err:  # PlanError, EngineError, a folder that cannot be written
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
