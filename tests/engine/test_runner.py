"""slim.engine and scripts/engine.sh: a wave of units run one after another or as Ray tasks (local, 2 CPUs) gives the
same files; a failing unit stops the run in one line; a SIGKILLed worker's task runs again and completes; SIGINT or
SIGTERM to the driver stops its tasks; Ray missing, RAY_ADDRESS unreachable, a bad ENGINE: one line each, nothing
run."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray  # the ray extra, which the dev extra includes

from conftest import REPO
from slim.engine import __main__ as engine_cli
from slim.engine import runner
from slim.engine.runner import EngineError, UnitFailed, run_wave
from slim.engine.units import PlanError, Unit, read_plan, unit_env, write_plan

ENGINE_SH = REPO / "scripts" / "engine.sh"
ODD = ["a b", 'q"uote\\', "new\nline", "tab\there", "ü"]  # arguments that must arrive as they were given


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the in-process tests (run_wave uses a session it finds and leaves it running)."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        object_store_memory=128 * 2**20,
    )
    yield ray
    ray.shutdown()


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


WRITE = "import os, sys; open(sys.argv[1], 'w').write(repr(sys.argv[2:]) + os.environ.get('SLIM_X', '-'))"


def wave(folder: Path) -> list[Unit]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        Unit(f"write {i}", py(WRITE, f"out{i}.txt", *ODD, str(i)), str(folder), {"SLIM_X": f"x{i}"}, gpus=0)
        for i in range(3)
    ]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for its parent counts as gone), waiting up to 30 s for it."""
    for _ in range(300):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in "ZX":
            return True
        time.sleep(0.1)
    return False


def wait_for(path: Path) -> str:
    for _ in range(1200):
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never written")


# ---------------------------------------------------------------------------------------------
# units and plan files


def test_a_plan_file_round_trips_and_bad_lines_are_one_line(tmp_path):
    units = wave(tmp_path / "w")
    write_plan(tmp_path / "plan.jsonl", units)
    assert len((tmp_path / "plan.jsonl").read_text().splitlines()) == 3  # one unit per line, newlines escaped
    assert read_plan(tmp_path / "plan.jsonl") == units
    bad = {
        '{"label": "x", "argv": [], "cwd": "/"}': "line 1 (x): argv must be a non-empty list",
        '{"label": "x", "argv": ["a"], "cwd": "rel"}': "cwd must be an absolute path",
        '{"label": "x", "argv": ["a"], "cwd": "/", "gpus": 2}': "gpus must be 0 or 1",
        '{"label": "x", "argv": ["a"], "cwd": "/", "wat": 1}': "unknown field(s) wat",
        "[1, 2": "line 1: not JSON",
    }
    for line, message in bad.items():
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(PlanError) as err:
            read_plan(tmp_path / "bad.jsonl")
        assert message in str(err.value) and "\n" not in str(err.value)
    write_plan(tmp_path / "twice.jsonl", [units[0], Unit("write/0", ["a"], "/")])  # both log to write_0.log
    with pytest.raises(PlanError, match="share the log write_0.log"):
        read_plan(tmp_path / "twice.jsonl")


def test_a_unit_carries_the_settings_but_not_secrets():
    env = {"SLIM_CACHE": "/c", "HF_HOME": "/h", "HF_TOKEN": "t", "OPENAI_API_KEY": "k", "MODEL": "m", "HOME": "/r"}
    assert unit_env(env) == {"HF_HOME": "/h", "MODEL": "m", "SLIM_CACHE": "/c"}
    assert unit_env({**env, "ENGINE_ENV": "HF_TOKEN HOME"}) == {
        "HF_HOME": "/h",
        "HF_TOKEN": "t",
        "HOME": "/r",
        "MODEL": "m",
        "SLIM_CACHE": "/c",
    }


# ---------------------------------------------------------------------------------------------
# run_wave


def test_a_wave_writes_the_same_files_under_both_engines(tmp_path, ray_session):
    records = run_wave(wave(tmp_path / "seq"), "sequential")
    out = io.StringIO()
    ray_records = run_wave(wave(tmp_path / "ray"), "ray", logs_dir=tmp_path / "logs", out=out)
    expected = {f"out{i}.txt": (repr([*ODD, str(i)]) + f"x{i}").encode() for i in range(3)}
    assert files(tmp_path / "seq") == files(tmp_path / "ray") == expected
    assert len(records) == len(ray_records) == 3 and all(r["attempt"] == 1 for r in ray_records)
    lines = out.getvalue().splitlines()
    done = sorted(line.split("] ")[1].split(":")[0] for line in lines[1:-1])
    assert done == ["write 0", "write 1", "write 2"] and [line[:5] for line in lines[1:-1]] == [
        "[1/3]",
        "[2/3]",
        "[3/3]",
    ]
    assert " s on " in lines[1] and lines[-1].startswith("engine ray: 3 units done")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["write_0.log", "write_1.log", "write_2.log"]


def test_a_failing_unit_stops_the_run_in_one_line(tmp_path, ray_session, capsys):
    # "slow" starts first and sleeps; "bad" waits until it runs, then fails for a real reason; "slow" is cancelled
    slow = py("import os, sys, time; open('slow.pid', 'w').write(str(os.getpid())); time.sleep(120); open('x', 'w')")
    bad = py(
        "import os, sys, time\n"
        "while not os.path.exists('slow.pid'): time.sleep(0.1)\n"
        "print('warning: first', file=sys.stderr); print('error: bad input', file=sys.stderr)\n"
        "print('exiting', file=sys.stderr); sys.exit(3)"
    )
    write_plan(tmp_path / "plan.jsonl", [Unit("slow", slow, str(tmp_path), gpus=0), Unit("bad", bad, str(tmp_path))])
    status = engine_cli.main(["run", str(tmp_path / "plan.jsonl"), "--engine", "ray", "--logs", str(tmp_path / "logs")])
    captured = capsys.readouterr()
    log = tmp_path / "logs" / "bad.log"
    assert status == 2
    assert captured.err == f"error: bad: bad input (exit 3; log: {log})\n"
    assert "Traceback" not in captured.out and "[1/2]" not in captured.out  # nothing finished
    assert log.read_text().splitlines()[1:] == ["warning: first", "error: bad input", "exiting"]  # all of stderr
    assert gone(int((tmp_path / "slow.pid").read_text()))  # cancelled: its command died with its worker
    assert not (tmp_path / "x").exists()
    # without an `error:` line, the last line of stderr
    write_plan(tmp_path / "plan2.jsonl", [Unit("b2", py("import sys; sys.exit('plain message')"), str(tmp_path))])
    with pytest.raises(UnitFailed, match=r"^b2: plain message \(exit 1; log: .*b2.log\)$"):
        run_wave(read_plan(tmp_path / "plan2.jsonl"), "ray", logs_dir=tmp_path / "logs", out=io.StringIO())
    # sequential: the command's own status, its message already on stderr as a script would show it
    with pytest.raises(UnitFailed) as err:
        run_wave(read_plan(tmp_path / "plan2.jsonl"), "sequential")
    assert (err.value.status, err.value.message) == (1, None)


def test_a_killed_worker_is_retried_and_the_command_resumes(tmp_path, ray_session):
    # the command records each attempt; the first writes half its output and sleeps (the test SIGKILLs its Ray
    # worker then); the second finds the half, writes the rest and renames it into place: the output once, whole
    code = (
        "import os, sys, time\n"
        "open('attempts', 'a').write(f'{os.getpid()}\\n')\n"
        "if not os.path.exists('part'):\n"
        "    open('part', 'w').write('first half\\n')\n"
        "    open('started', 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "open('part', 'a').write('second half\\n'); os.replace('part', 'out.txt')"
    )
    # under bash, as a script's command would be: the python process is the worker's great-grandchild
    units = [Unit("resumable", ["bash", "-c", 'python -c "$0"; echo bash done', code], str(tmp_path), gpus=0)]
    out, result = io.StringIO(), {}
    thread = threading.Thread(target=lambda: result.update(r=run_wave(units, "ray", logs_dir=tmp_path / "l", out=out)))
    thread.start()
    first = int(wait_for(tmp_path / "started"))
    # the worker running the task: Ray names its process after the task
    workers = [p.parent.name for p in Path("/proc").glob("[0-9]*/cmdline") if p.read_bytes().startswith(b"ray::resum")]
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGKILL)
    assert gone(first)  # the command died with its worker, before the retry wrote anything
    thread.join(timeout=300)
    assert not thread.is_alive() and result["r"][0]["attempt"] == 2
    assert (tmp_path / "out.txt").read_text() == "first half\nsecond half\n"
    assert len((tmp_path / "attempts").read_text().split()) == 2 and not (tmp_path / "part").exists()
    assert "[1/1] resumable: " in out.getvalue() and "(attempt 2: the worker of the first died)" in out.getvalue()
    log = (tmp_path / "l" / "resumable.log").read_text()
    assert log.count("=== slim.engine: resumable: attempt") == 2 and log.splitlines().count("bash done") == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_driver_stops_its_tasks_within_seconds(tmp_path, signum):
    # Ctrl-C, or a scheduler's SIGTERM, sent to the driver alone (the Ray workers are in sessions of their own):
    # the driver cancels the running task, whose command dies with it, and exits 130 with one line. (SIGTERM used
    # to meet Ray's own handler, which ended the driver at once with status 1 and a stack dump, cancelling nothing.)
    code = "import os, time; open('started', 'w').write(str(os.getpid())); time.sleep(300)"
    write_plan(tmp_path / "plan", [Unit("sleeper", py(code), str(tmp_path), gpus=0)])
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE", "RAY_ADDRESS")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "slim.engine", "run", "plan", "--engine", "ray", "--logs", "logs"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO), "RAY_TMPDIR": "/tmp", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    command = int(wait_for(tmp_path / "started"))
    asked = time.time()
    driver.send_signal(signum)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130 and stderr.strip().splitlines()[-1].startswith("error: interrupted;"), stderr
    assert time.time() - asked < 30  # not the task's 300 s
    assert gone(command)


def test_workers_that_do_not_see_the_folder_stop_the_run_before_any_work(tmp_path, ray_session, monkeypatch):
    # as a node without the shared folder would answer (the marker check itself runs on the real workers above)
    monkeypatch.setattr(runner, "_sees", lambda marker, cwds: ("node7", False, cwds))
    with pytest.raises(EngineError, match=r"workers on node7 do not see .*shared storage") as err:
        run_wave(wave(tmp_path / "w"), "ray", logs_dir=tmp_path / "logs", out=io.StringIO())
    assert "\n" not in str(err.value) and not list((tmp_path / "w").iterdir())
    assert not [p for p in (tmp_path / "logs").iterdir()]  # the marker is removed, no unit ran


def test_ray_missing_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as without the extra
    write_plan(tmp_path / "plan.jsonl", wave(tmp_path / "w"))
    assert engine_cli.main(["run", str(tmp_path / "plan.jsonl"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[ray]' (or bash install.sh --dev)" in err
    assert not list((tmp_path / "w").iterdir())


def test_bad_engine_and_workers_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="must be sequential or ray, got 'spark'"):
        run_wave(wave(tmp_path), "spark")
    with pytest.raises(ValueError, match="--workers .* at least 1"):
        run_wave(wave(tmp_path), "ray", workers=0)


# ---------------------------------------------------------------------------------------------
# scripts/engine.sh


SCRIPT = """set -euo pipefail
. "$ENGINE_SH"
unit "first one" -- python -c 'import os, sys; open("a.txt", "w").write(repr(sys.argv[1:]) + os.environ["SLIM_X"])' \\
  'a b' 'q"uote\\' $'new\\nline' "$(printf 'tab\\there')"
unit second --gpus 0 --cpus 1 -- python -c 'print("second says"); open("b.txt", "w").write("b")'
wait_units
unit third --gpus 0 -- python -c 'open("c.txt", "w").write(open("a.txt").read() + open("b.txt").read())'
wait_units
"""


def bash(script: str, folder: Path, **env) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "s.sh").write_text(script)
    full = {k: v for k, v in os.environ.items() if k not in ("ENGINE", "RAY_ADDRESS")}
    full.update(ENGINE_SH=str(ENGINE_SH), SLIM_X="x", OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", "s.sh"], cwd=folder, env=full, capture_output=True, text=True, timeout=300)


def test_engine_sh_sequential_is_the_script_without_it(tmp_path):
    # `unit LABEL ... --` in front of a command changes nothing: output, files, and set -e's exit status
    script = SCRIPT + "unit fails -- python -c 'import sys; print(\"out\"); sys.exit(3)'\necho not reached\n"
    plain = script.replace('. "$ENGINE_SH"\n', "")
    for label in ('unit "first one" -- ', "unit second --gpus 0 --cpus 1 -- ", "unit third --gpus 0 -- "):
        plain = plain.replace(label, "")
    plain = plain.replace("unit fails -- ", "").replace("wait_units\n", "")
    assert "unit" not in plain
    with_units, without = bash(script, tmp_path / "units"), bash(plain, tmp_path / "plain")
    assert (with_units.returncode, with_units.stdout, with_units.stderr) == (3, "second says\nout\n", "")
    assert (without.returncode, without.stdout, without.stderr) == (3, "second says\nout\n", "")
    (tmp_path / "units" / "s.sh").unlink(), (tmp_path / "plain" / "s.sh").unlink()
    assert files(tmp_path / "units") == files(tmp_path / "plain")
    expected = repr(["a b", 'q"uote\\', "new\nline", "tab\there"]) + "x"
    assert (tmp_path / "plain" / "c.txt").read_text() == expected + "b"


def test_engine_sh_ray_writes_what_sequential_writes(tmp_path):
    (tmp_path / "tmp").mkdir()
    seq = bash(SCRIPT, tmp_path / "seq")
    on_ray = bash(
        SCRIPT,
        tmp_path / "ray",
        ENGINE="ray",
        ENGINE_LOGS=str(tmp_path / "logs"),
        TMPDIR=str(tmp_path / "tmp"),
        RAY_TMPDIR="/tmp",
    )
    assert seq.returncode == 0 and on_ray.returncode == 0, on_ray.stderr
    assert files(tmp_path / "seq") == files(tmp_path / "ray") and (tmp_path / "ray" / "c.txt").exists()
    assert on_ray.stderr == ""
    progress = [line for line in on_ray.stdout.splitlines() if line.startswith("[")]
    assert [line[:5] for line in progress] == ["[1/2]", "[2/2]", "[1/1]"]  # two waves, the second after the first
    assert sorted(line[6:].split(":")[0] for line in progress[:2]) == ["first one", "second"]
    assert progress[2].startswith("[1/1] third: ")
    assert "second says" in (tmp_path / "logs" / "second.log").read_text()  # the command's output: in its log
    assert not list((tmp_path / "tmp").iterdir())  # the waves' plan files: removed


def test_engine_sh_bad_input_is_one_line_and_nothing_runs(tmp_path):
    bogus = bash(SCRIPT, tmp_path / "bogus", ENGINE="spark")
    assert (bogus.returncode, bogus.stderr) == (2, "error: ENGINE must be sequential or ray, got 'spark'.\n")
    # Ray hidden from Python (as when the extra is not installed): one line with the install command
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    hidden = bash(SCRIPT, tmp_path / "hidden", ENGINE="ray", PYTHONPATH=str(shim))
    assert hidden.returncode == 2 and hidden.stderr.count("\n") == 1
    assert hidden.stderr.startswith("error: ENGINE=ray needs Ray") and "pip install -e '.[ray]'" in hidden.stderr
    # RAY_ADDRESS where nothing listens: one line, at once, nothing started
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = bash(SCRIPT, tmp_path / "closed", ENGINE="ray", RAY_ADDRESS=f"127.0.0.1:{port}")
    assert closed.returncode == 2 and closed.stderr.count("\n") == 1, closed.stderr
    assert closed.stderr.startswith(f"error: RAY_ADDRESS=127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}")
    for run in (bogus, hidden, closed):
        assert run.stdout == ""
    for folder in ("bogus", "hidden", "closed"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["s.sh"]


def test_resources_one_gpu_per_task_where_there_are_gpus_else_a_share_of_the_cpus():
    class Cluster:  # what ray.nodes() says of a GPU node with 16 CPUs and 2 GPUs and a CPU node with 8
        @staticmethod
        def nodes():
            gpu_node, cpu_node = {"CPU": 16.0, "GPU": 2.0}, {"CPU": 8.0}
            dead = {"CPU": 64.0, "GPU": 8.0}
            return [
                {"Alive": True, "Resources": gpu_node},
                {"Alive": True, "Resources": cpu_node},
                {"Alive": False, "Resources": dead},
            ]

    units = [Unit("gpu", ["a"], "/"), Unit("cpu", ["a"], "/", gpus=0), Unit("asks 4", ["a"], "/", gpus=0, cpus=4)]
    plans = runner._resources(Cluster, units, workers=None)
    assert [(o["num_gpus"], o["num_cpus"], threads) for o, threads in plans] == [(1, 8, 8), (0, 8, 8), (0, 4, 4)]
    assert all(o["max_retries"] == runner.MAX_RETRIES and o["retry_exceptions"] is False for o, _ in plans)
    # two at once: the 24 CPUs halved, but no task larger than the largest node
    assert [t for _, t in runner._resources(Cluster, units[1:2] * 2, workers=2)] == [12, 12]
    assert [t for _, t in runner._resources(Cluster, units[1:2], workers=1)] == [16]
    with pytest.raises(EngineError, match="asks for 20 CPUs; the largest Ray node has 16"):
        runner._resources(Cluster, [Unit("big", ["a"], "/", cpus=20)], workers=None)
