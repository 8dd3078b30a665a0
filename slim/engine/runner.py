"""Running one wave of units: one after another here, or as Ray tasks, locally or on a cluster (RAY_ADDRESS).

Under Ray each unit is a task that runs its command as a subprocess, stdout and stderr to `<logs>/<label>.log`
(appended, a header line per attempt). The command runs under a small guard process that the worker's death
reaches (Linux PR_SET_PDEATHSIG) and that then kills the command's whole process group, so a worker killed with
SIGKILL leaves nothing running; Ray runs the task again (max_retries) and the command reads back what it had
written (the scripts resume). A command that exits non-zero is not retried: the other tasks are cancelled and the
run stops with the command's last `error:` line.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from .units import Unit, check_wave, log_name

__all__ = ["EngineError", "UnitFailed", "run_wave", "ENGINES", "INSTALL_HINT", "MAX_RETRIES"]

ENGINES = ("sequential", "ray")
MAX_RETRIES = 3  # attempts after the first, for a task whose worker or node died (not for a failing command)
INSTALL_HINT = "pip install -e '.[ray]' (or bash install.sh --dev)"
_HEADER = b"=== slim.engine: "  # starts each attempt's header line in a unit's log

# Run by the worker as `python -c _GUARD LIFE STATUS ARGV...`. It forks at once, its first process exits and it
# leaves the worker's session: Ray SIGKILLs a dead or cancelled worker's children (and, configured so, its process
# group), which would leave the command's own children running. The guard runs the command in a session of its own
# and waits. The worker holds the write end of the pipe LIFE, so the worker's end, however it comes (SIGKILL, cancel,
# shutdown), is an end of file here, and the guard then kills the command's whole process group. The exit status
# goes back through the pipe STATUS. Linux: the command also dies if the guard itself is killed (PR_SET_PDEATHSIG).
_GUARD = r"""
import ctypes, os, signal, subprocess, sys, threading
life, status = int(sys.argv[1]), int(sys.argv[2])
if os.fork():
    os._exit(0)
os.setsid()
def die_with_guard():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
try:
    child = subprocess.Popen(sys.argv[3:], start_new_session=True, preexec_fn=die_with_guard)
except OSError as err:
    print(f"error: cannot run {sys.argv[3]}: {err.strerror}", file=sys.stderr)
    os.write(status, b"127")
    os._exit(0)
def watch():
    while os.read(life, 1):
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
os.write(status, str(child.wait()).encode())
os._exit(0)
"""


class EngineError(RuntimeError):
    """The engine cannot run the wave (Ray missing or unreachable, storage not shared, a task lost): one line."""


class UnitFailed(EngineError):
    """A unit's command failed: `message` (None where the command printed its own error), exit `status`."""

    def __init__(self, message: str | None, status: int):
        super().__init__(message or f"a unit failed with exit status {status}")
        self.message, self.status = message, status


def run_wave(
    units: list[Unit],
    engine: str = "sequential",
    workers: int | None = None,
    logs_dir: str | os.PathLike | None = None,
    out: TextIO | None = None,
) -> list[dict]:
    """Run `units` (one wave: any order, all may run at once) and return one record per unit, in order:
    host, seconds, attempt. `sequential`: one after another here, output as it comes, stopping at the first that
    fails (UnitFailed with its status). `ray`: as Ray tasks, at most `workers` at once (default: as many as the
    resources allow), logs under `logs_dir` (default logs/engine), one progress line per finished task on `out`.
    """
    if engine not in ENGINES:
        raise ValueError(f"--engine (ENGINE) must be sequential or ray, got '{engine}'.")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers (ENGINE_WORKERS) must be at least 1, got {workers}.")
    check_wave(units)
    if engine == "sequential":
        return _run_sequential(units)
    return _run_ray(units, workers, Path(logs_dir or "logs/engine").resolve(), out or sys.stdout)


def _run_sequential(units: list[Unit]) -> list[dict]:
    import subprocess

    records = []
    for unit in units:
        start = time.time()
        rc = subprocess.run(unit.argv, cwd=unit.cwd, env={**os.environ, **unit.env}).returncode
        if rc:
            raise UnitFailed(None, rc if rc > 0 else 128 - rc)
        records.append({"host": socket.gethostname(), "seconds": time.time() - start, "attempt": 1})
    return records


# ---------------------------------------------------------------------------------------------
# Ray


def import_ray():
    """The ray module, or an EngineError with the install command. Its tasks are sent by value (the workers need
    Ray, not this package, to run them)."""
    try:
        import ray
    except ImportError:
        raise EngineError(f"ENGINE=ray needs Ray, which {sys.executable} does not have: {INSTALL_HINT}.") from None
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray


def _check_reachable(address: str) -> None:
    """One line, before Ray tries (it would wait minutes), when nothing answers at RAY_ADDRESS's host and port."""
    if address in ("auto", "local"):
        return  # Ray looks for it itself, and says at once when there is none
    host_port = re.sub(r"^[a-z]+://", "", address).rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"RAY_ADDRESS={address} is not host:port (e.g. 10.0.0.1:6379, or ray://10.0.0.1:10001).")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise EngineError(
            f"RAY_ADDRESS={address}: nothing answers at {host}:{port} ({why}): start the cluster there "
            "(ray start --head) or unset RAY_ADDRESS to run on this machine; nothing was started."
        ) from None


def _connect(ray) -> bool:
    """Start or join Ray, quietly; True when this call started the session (and the caller shuts it down)."""
    if ray.is_initialized():
        return False  # the caller's own session (tests, notebooks): used as it is and left running
    address = os.environ.get("RAY_ADDRESS") or None
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, **quiet)
        else:  # "local": a new Ray in this command, never a cluster found on the machine
            ray.init(address="local", include_dashboard=False, object_store_memory=128 * 2**20, **quiet)
    except EngineError:
        raise
    except Exception as err:  # Ray's own errors: several classes, some only RuntimeError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = f"RAY_ADDRESS={address}" if address else "a local Ray"
        hint = " (set RAY_TMPDIR to a short folder, e.g. /tmp)" if "AF_UNIX path length" in first else ""
        raise EngineError(f"{where}: Ray did not start: {first}{hint}") from None
    return True


def _sees(marker: str, cwds: list[str]) -> tuple[str, bool, list[str]]:
    """(On each node) its host name, whether it sees the driver's marker file, the working folders it lacks."""
    import os
    import socket

    return socket.gethostname(), os.path.exists(marker), [c for c in cwds if not os.path.isdir(c)]


def _check_shared(ray, logs_dir: Path, cwds: list[str]) -> None:
    """Before any work: a task on every node with resources must see a file the driver just wrote under
    `logs_dir`, and the units' working folders; else one line (the folders must be shared storage)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = logs_dir / f".engine-marker-{secrets.token_hex(8)}"
    marker.write_text("written by the slim.engine driver to check that the workers see this folder\n")
    try:
        nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
        sees = ray.remote(_sees)
        refs = [
            sees.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            for n in nodes
        ]
        refs = [r.remote(str(marker), cwds) for r in refs] or [sees.options(num_cpus=0).remote(str(marker), cwds)]
        answers = ray.get(refs, timeout=600)
    except ray.exceptions.GetTimeoutError:
        raise EngineError("the Ray workers did not answer within 10 minutes (is the cluster busy?).") from None
    finally:
        marker.unlink(missing_ok=True)
    blind = sorted({host for host, seen, _ in answers if not seen})
    lacking = sorted({c for *_, missing in answers for c in missing})
    if blind or lacking:
        hosts = ", ".join(sorted({h for h, seen, missing in answers if not seen or missing}))
        what = f"{logs_dir}" + (f" and {', '.join(lacking)}" if lacking else "")
        raise EngineError(
            f"the Ray workers on {hosts} do not see {what}: the output, cache and working folders must be shared "
            "storage at the same path on every node (e.g. NFS); nothing was run."
        )


def _resources(ray, units: list[Unit], workers: int | None) -> list[tuple[dict, int]]:
    """Each unit's task options and threads: one GPU (and its share of the node's CPUs) where the cluster has GPUs
    and the unit uses one, else its `cpus` or an equal share of the CPUs among the tasks that run at once."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    cpus = [int(r.get("CPU", 0)) for r in nodes]
    gpu_nodes = [(int(r.get("CPU", 0)), int(r["GPU"])) for r in nodes if r.get("GPU")]
    at_once = min(len(units), workers or len(units)) or 1
    share = max(1, min(max(cpus, default=1), sum(cpus) // at_once))
    per_gpu = max(1, min((c // g for c, g in gpu_nodes), default=1))
    plans = []
    for unit in units:
        gpu = bool(unit.gpus and gpu_nodes)
        threads = unit.cpus or (per_gpu if gpu else share)
        if threads > max(cpus, default=0):
            raise EngineError(f"unit '{unit.label}' asks for {threads} CPUs; the largest Ray node has {max(cpus)}.")
        opts = {"num_cpus": threads, "num_gpus": 1 if gpu else 0}
        plans.append(({**opts, "max_retries": MAX_RETRIES, "retry_exceptions": False}, threads))
    return plans


def _run_unit(unit: dict, log: str, offset: int, threads: int) -> dict:
    """(On a Ray worker) the unit's command under the guard, in its folder, stdout and stderr appended to `log`;
    its exit status (negative: killed by that signal), time, host, attempt (counted from the headers after
    `offset`) and, if it failed, its stderr's last lines."""
    import os
    import shlex
    import socket
    import subprocess
    import sys
    import time

    start, host = time.time(), socket.gethostname()
    env = {**os.environ, **unit["env"], "ENGINE": "sequential"}  # a unit's own units run in it, one after another
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the worker's Python first
    if "OMP_NUM_THREADS" not in unit["env"]:
        env["OMP_NUM_THREADS"] = str(threads)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as f:
        with open(log, "rb") as before:
            before.seek(offset)
            attempt = before.read().count(_HEADER) + 1
        command = shlex.join(unit["argv"]).replace("\n", "\\n")  # one line
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(_HEADER + os.fsencode(f"{unit['label']}: attempt {attempt} on {host} at {when}: {command} ===\n"))
        f.flush()
        life_r, life_w = os.pipe()
        status_r, status_w = os.pipe()
        cmd = [sys.executable, "-c", _GUARD, str(life_r), str(status_w), *unit["argv"]]
        proc = subprocess.Popen(
            cmd,
            cwd=unit["cwd"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.PIPE,
            pass_fds=(life_r, status_w),
        )
        os.close(life_r)
        os.close(status_w)
        tail = b""
        while chunk := os.read(proc.stderr.fileno(), 65536):  # stderr to the log, and its tail kept
            f.write(chunk)
            f.flush()
            tail = (tail + chunk)[-16384:]
        proc.wait()
        with os.fdopen(status_r, "rb") as status:
            rc = int(status.read() or -9)  # nothing: the guard was killed
        os.close(life_w)
    return {"rc": rc, "seconds": time.time() - start, "host": host, "attempt": attempt, "tail": tail if rc else b""}


def error_line(tail: bytes) -> str:
    """A failed command's message: its last `error: ...` line without the prefix, else its last line of stderr
    (empty without one)."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", tail.decode(errors="replace")) if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:") :].strip()
    return lines[-1] if lines else ""


def _count(units: list) -> str:
    return f"{len(units)} unit{'s' if len(units) != 1 else ''}"


def _run_ray(units: list[Unit], workers: int | None, logs_dir: Path, out: TextIO) -> list[dict]:
    ray = import_ray()
    owned = _connect(ray)
    running: dict = {}  # ObjectRef -> unit index
    sigterm = _interrupt_on_sigterm()
    try:
        logs_dir.mkdir(parents=True, exist_ok=True)
        _check_shared(ray, logs_dir, sorted({u.cwd for u in units}))
        plans = _resources(ray, units, workers)
        task = ray.remote(_run_unit)
        logs = [logs_dir / log_name(u.label) for u in units]
        offsets = [p.stat().st_size if p.exists() else 0 for p in logs]  # this run's attempts start here
        records: list[dict | None] = [None] * len(units)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        limit = f"at most {workers} at once" if workers else "as many at once as the resources allow"
        print(f"engine ray: {_count(units)}, {limit} ({gpus} GPUs); logs in {logs_dir}", file=out, flush=True)
        start, todo, done = time.time(), list(range(len(units))), 0
        while todo or running:
            while todo and (workers is None or len(running) < workers):
                i = todo.pop(0)
                unit, (opts, threads) = units[i], plans[i]
                record = {"label": unit.label, "argv": unit.argv, "cwd": unit.cwd, "env": unit.env}
                running[
                    task.options(name=unit.label[:100], **opts).remote(record, str(logs[i]), offsets[i], threads)
                ] = i
            ready, _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ready[0])
            unit, log = units[i], logs[i]
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # its worker or node died once more than retried, or a bug here
                cause = getattr(err, "cause", None) or err
                why = "" if isinstance(cause, ray.exceptions.RayError) else ": " + " ".join(str(cause).split())[:300]
                raise EngineError(
                    f"{unit.label}: its Ray task failed ({type(cause).__name__}{why}); a task whose worker dies is "
                    f"run again {MAX_RETRIES} times at most (log: {log})."
                ) from None
            if result["rc"]:
                rc = result["rc"] if result["rc"] > 0 else 128 - result["rc"]
                why = error_line(result["tail"]) or (f"killed by signal {-result['rc']}" if result["rc"] < 0 else "")
                message = f"{unit.label}: {why or 'failed, with nothing on stderr'} (exit {rc}; log: {log})"
                raise UnitFailed(message, 2)
            done += 1
            retried = f" (attempt {result['attempt']}: the worker of the first died)" if result["attempt"] > 1 else ""
            line = f"[{done}/{len(units)}] {unit.label}: {result['seconds']:.1f} s on {result['host']}{retried}"
            print(line, file=out, flush=True)
            records[i] = {k: result[k] for k in ("host", "seconds", "attempt")}
        print(f"engine ray: {_count(units)} done in {time.time() - start:.1f} s", file=out, flush=True)
        return records
    finally:
        if sigterm is not None:  # first, so that a second SIGTERM ends this at once
            signal.signal(signal.SIGTERM, sigterm)
        for ref in running:  # a failure or an interrupt: the others stop (their commands die with their workers)
            try:
                ray.cancel(ref, force=True)
            except Exception:  # Ray itself gone: its workers, and so the commands, went with it
                pass
        if owned:
            ray.shutdown()


def _interrupt_on_sigterm():
    """Make SIGTERM (a scheduler's stop, `kill`) an interrupt like Ctrl-C: the running tasks are cancelled and the
    driver exits 130 with its one line. Ray's own handler, installed when Ray starts, would end the driver at once
    with status 1 and a stack dump, skipping the cancel. Returns the handler to put back after the wave: the one it
    replaced, or the default where that was not Python's (Ray's); None off the main thread, where none can be set."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt) or signal.SIG_DFL
