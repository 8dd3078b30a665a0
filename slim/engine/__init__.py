"""Units of work and the engines that run them (#25): the shell scripts' commands one after another (sequential,
the default) or as Ray tasks, locally or on a cluster (RAY_ADDRESS).

    units   a unit (one command: label, argv, cwd, env, resources), the plan file of a wave (JSON lines)
    runner  run_wave: a wave's units one after another, or as Ray tasks with their logs, retries and progress

`python -m slim.engine run PLAN` runs a plan file; scripts/engine.sh gives the shell scripts `unit` and `wait_units`.
"""

from .runner import ENGINES, EngineError, UnitFailed, run_wave
from .units import PlanError, Unit, read_plan, write_plan

__all__ = ["ENGINES", "EngineError", "PlanError", "Unit", "UnitFailed", "read_plan", "run_wave", "write_plan"]
