"""Atomic writes, and records that tell a damaged file from a good one.

Atomic writes: a reader never sees half a file, and an interrupted write leaves
nothing behind. Records: what a run writes and reads back later carries its
size and sha256 (in its manifest, or in `<name>.sha256.json` beside it), so a
file cut short or overwritten afterwards is recognised when read: a cache is
recomputed with a one-line warning, anything else is a one-line
DamagedArtefact error naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path` (mode 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; on success it replaces the folder `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_default(x):
    """JSON for what `json` cannot write itself: numpy arrays and numbers, paths; anything else as text."""
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return x.tolist()
    return str(x)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=json_default))


def write_csv(df, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Telling a damaged artefact from a good one: size and sha256 recorded when written, checked when read.

CHECK_SUFFIX = ".sha256.json"


class DamagedArtefact(RuntimeError):
    """A file this project wrote no longer matches what was written (cut short, overwritten, unreadable).

    `path` and `problem` let a caller that can recompute the file say so in a
    warning; the message (path, problem, what to do) is one line for the user.
    """

    def __init__(
        self, path: str | os.PathLike, problem: str, todo: str = "delete it and rerun the step that wrote it."
    ):
        self.path, self.problem = Path(path), " ".join(str(problem).split())
        super().__init__(f"{self.path} is damaged ({self.problem}): {todo}")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """What a reader checks a file against: its size in bytes and its sha256."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def record_problem(path: str | os.PathLike, record: dict) -> str | None:
    """What is wrong with `path` against its `record` (None: it matches). The size is checked first: it is free."""
    path = Path(path)
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{size} bytes, {record.get('bytes')} written"
    if sha256_file(path) != record.get("sha256"):
        return "its sha256 differs from the one recorded when it was written"
    return None


def check_path(path: str | os.PathLike) -> Path:
    """The record of a file that has no manifest of its own: `<name>.sha256.json` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECK_SUFFIX)


def _record_of(path: Path) -> dict | None:
    try:
        record = json.loads(check_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_checked(path: str | os.PathLike, write) -> Path:
    """`write(tmp)` a file atomically to `path`, with its size and sha256 recorded beside it.

    The record is written before the file replaces the old one and keeps the
    old file's record as `previous`, so a run killed between the two steps
    leaves a file that still matches its record: never a false alarm.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        write(tmp)
        old = _record_of(path) if path.exists() else None
        previous = {k: old[k] for k in ("bytes", "sha256") if k in old} if old else None
        write_json(check_path(path), {"file": path.name, **file_record(tmp), "previous": previous})
    return path


def verify(path: str | os.PathLike, todo: str = "delete it and rerun the step that wrote it.") -> bool:
    """Raise DamagedArtefact when `path` differs from its record; False when it has none (written before records)."""
    record_file = check_path(path)
    if not record_file.exists():
        if not Path(path).is_file():
            raise DamagedArtefact(path, "the file is missing", todo)
        return False
    record = _record_of(Path(path))
    if record is None:
        raise DamagedArtefact(record_file, "unreadable record", f"delete it and {path} and rerun.")
    problem = record_problem(path, record)
    if problem and not (record.get("previous") and record_problem(path, record["previous"]) is None):
        raise DamagedArtefact(path, problem, todo)
    return True


def parse_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged file raises: OS and format errors, safetensors' header errors, bad zip members."""
    import zipfile

    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, SafetensorError)


@contextlib.contextmanager
def reading(path: str | os.PathLike, todo: str = "delete it and rerun the step that wrote it."):
    """Read `path` inside this block: checked against its record first, and any parse error becomes one
    DamagedArtefact naming the file. A file written before records existed is checked by parsing alone."""
    verify(path, todo)
    try:
        yield
    except DamagedArtefact:
        raise
    except parse_errors() as err:
        raise DamagedArtefact(path, f"{type(err).__name__}: {str(err)[:200]}", todo) from None


def warn_rebuild(err: DamagedArtefact, action: str) -> None:
    """The one-line warning of a damaged cache that is recomputed: the file, what is wrong, what happens now."""
    logging.getLogger("slim").warning("%s is damaged (%s): %s", err.path, err.problem, action)


# ---------------------------------------------------------------------------------------------
# Tests only: a deterministic kill -9 point

_KILL_COUNTS: dict[str, int] = {}


def kill_point(stage: str) -> None:
    """Called right after each durable write of a long stage; with `SLIM_TEST_KILL_AFTER="<stage>:<n>"` (tests only)
    the process SIGKILLs itself at that stage's n-th call, else this costs one dict lookup."""
    target = os.environ.get("SLIM_TEST_KILL_AFTER")
    if target is None:
        return
    name, _, n = target.partition(":")
    if name == stage:
        _KILL_COUNTS[stage] = _KILL_COUNTS.get(stage, 0) + 1
        if _KILL_COUNTS[stage] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# One writer per artefact

_LOCKS: dict[Path, list] = {}  # lock file -> [open file, depth]: re-entrant within a process


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def artefact_lock(path: str | os.PathLike, wait: bool | None = None):
    """Hold `path` (a file or folder this run is about to compute) while the block runs: an flock on
    `.<name>.lock` beside it. Runs that write other artefacts of the same folder go on at once; a run
    that wants the same one waits (one line: who holds it) and, once inside, should look again for what
    the first wrote before computing. `wait=False` (or `SLIM_NO_WAIT=1` when `wait` is None) stops at
    once with a one-line RuntimeError instead. Re-entrant within a process.
    """
    if wait is None:
        wait = not os.environ.get("SLIM_NO_WAIT")
    lock_path = _lock_file(Path(path).resolve())
    held = _LOCKS.get(lock_path)
    if held is not None:
        held[1] += 1
        try:
            yield Path(path)
        finally:
            held[1] -= 1
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = " ".join(lock.read().split()) or "another run"
            if not wait:
                raise RuntimeError(
                    f"{path} is being written by {holder}: wait for it to finish or pass another --out_dir."
                ) from None
            logging.getLogger("slim").info("%s is being written by %s: waiting for it ...", path, holder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:300]}) since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        _LOCKS[lock_path] = [lock, 1]
        try:
            yield Path(path)
        finally:
            del _LOCKS[lock_path]
            fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        lock.close()
