"""reproduce.sh end to end in quick mode on a tiny random Llama: every artefact of the paper is written, with
intervals, and listed in the index; the README's generated section is replaced between its markers. MODELS runs
`MODEL=<m> bash reproduce.sh` for each model in turn (checked through a `bash` that notes its calls, on the end to
end run's artefacts), then Table 1 across the models."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO, TQA_DIR, make_tokenizer, tiny_model
from slim.paper.index import BEGIN, END, update_readme


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    model_dir = root / "tiny_llama"
    tiny_model("llama", vocab_size=len(make_tokenizer())).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    nq = root / "nq_open.jsonl"  # NQ-open's format: a question and its list of gold answers
    nq.write_text(
        "\n".join(
            json.dumps({"question": q, "answer": a})
            for q, a in [
                ("who wrote the origin of species", ["Charles Darwin"]),
                ("what is the capital of france", ["Paris"]),
                ("how many legs does a spider have", ["eight", "8"]),
            ]
        )
        + "\n"
    )
    readme = root / "README.md"
    readme.write_text(f"# A project\n\n## Results\n\n{BEGIN}\nold text\n{END}\n\n## After\n")
    proc = run_reproduce(root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc.stdout, readme


def run_reproduce(root, **env_extra) -> subprocess.CompletedProcess:
    """reproduce.sh in quick mode on the tiny model, the NQ file and the README that `reproduced` put in `root`."""
    model_dir = root / "tiny_llama"
    env = {
        **os.environ,
        "SLIM_TQA_DIR": str(TQA_DIR),
        "MODEL": "llama_7B",
        "N_QUESTIONS": "40",
        "MAX_QUESTIONS": "2",
        "SWEEP_Q": "2",
        "KAPPAS": "5",
        "ALPHAS": "5",
        "STRENGTHS": "0.5",
        "NUM_HEADS": "4",
        "FIGURE_BLS": "1.0 2.0",
        "NQ_FILE": str(root / "nq_open.jsonl"),
        "NQ_QUESTIONS": "3",
        "OUT_DIR": str(root / "validation"),
        "PAPER_DIR": str(root / "paper"),
        "README": str(root / "README.md"),
        # one thread in every process, under either engine: sums over two threads round otherwise in the last bits
        "OMP_NUM_THREADS": "1",
        **env_extra,
    }
    flags = ["--model_dir", str(model_dir), "--device", "cpu", "--epochs", "5", "--max_new_tokens", "4"]
    flags += ["--judge_name", f"local:{model_dir}", "--info_name", f"local:{model_dir}"]
    return subprocess.run(["bash", "reproduce.sh", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)  # fmt: skip


def test_every_artefact_is_written_and_indexed(reproduced):
    root, stdout, _ = reproduced
    index = json.loads((root / "paper" / "index_llama_7B_quick.json").read_text())
    missing = [a["name"] for a in index["artefacts"] if not a["exists"]]
    assert not missing, missing
    assert len(index["artefacts"]) == 12 and index["seconds"] > 0 and "reproduce.sh" in index["command"]
    assert index["command"].startswith('MODEL="llama_7B" ') and 'NUM_HEADS="4"' in index["command"]
    # Table 1's five summaries and ITI's K, with the rule that chose it (here the caller's NUM_HEADS)
    assert len(index["table1_summaries"]) == 5 and all(os.path.exists(p) for p in index["table1_summaries"])
    assert index["iti_num_heads"] == {"k": 4, "rule": "NUM_HEADS"}
    for a in index["artefacts"]:
        assert os.path.getsize(a["path"]) > 0
    assert "index:" in stdout and "missing" not in stdout.split("=== reproduce.sh (quick): 8/8")[-1]
    # each stage's seconds, from the ledger of this command's one invocation (stage 8 closes after the index)
    assert list(index["stage_seconds"]) == [f"{i}/8" for i in range(1, 8)]
    assert all(s["invocations"] == 1 and s["complete"] for s in index["stage_seconds"].values())
    ledger = (root / "validation" / "stage_seconds_llama_7B.tsv").read_text().splitlines()
    assert [line.split("\t")[2] for line in ledger] == [f"{i}/8" for i in range(1, 9)]
    assert {line.split("\t")[5] for line in ledger} == {"complete"}
    assert all(line.split("\t")[6] == index["command"] for line in ledger)


def test_tables_carry_intervals_and_every_row(reproduced):
    root, _, _ = reproduced
    paper = root / "paper"
    table1 = (paper / "table1_llama_7B_quick.md").read_text()
    for method in ("| baseline |", "| iti |", "| slim |", "| mimic |", "| linear_act |"):
        assert method in table1
    # pooled values with their intervals, and paired changes with p-values, in the tables that compare
    for name in ("table1", "table2", "table3"):
        text = (paper / f"{name}_llama_7B_quick.md").read_text()
        assert "95 % bootstrap intervals over questions" in text and " to " in text, name
        assert "Change from the unintervened model" in text and "p (True*Info)" in text, name
        assert "Produced " in text and "reproduce.sh" in text, name
    table2 = (paper / "table2_llama_7B_quick.md").read_text()
    assert "| slim_on_iti_heads |" in table2 and "| iti_on_slim_layer |" in table2
    versus = (paper / "versus_iti_llama_7B_quick.md").read_text()  # every other run against ITI's answers
    assert "Change from iti (alpha = " in versus and "| SLIM | slim |" in versus and "| ITI | iti |" in versus
    assert "| ITI | iti | alpha" not in versus.split("Change from iti")[1]  # ITI is not paired with itself
    table3 = (paper / "table3_llama_7B_quick.md").read_text()
    assert "binary cross-entropy" in table3 and "| l2 |" in table3


def test_readme_section_is_generated_between_its_markers(reproduced):
    root, _, readme = reproduced
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# A project") and text.rstrip().endswith("## After")
    section = text.split(BEGIN)[1].split(END)[0]
    assert "Table 1" in section and "| linear_act |" in section and "not the paper's 7B" in section
    assert "reproduce.sh" in section and "wall time" in section
    assert "![Figure 2 (SLIM)](paper/figure2_llama_7B_quick_slim.png)" in section


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        update_readme(readme, "x")
    assert readme.read_text() == "# no markers\n"


def _noting_bash(root, fail_on=None):
    """A `bash` first on PATH that notes each call (MODEL, whether MODELS and README reach it, the arguments) and
    does nothing else; it fails for the model `fail_on`. The reproduce.sh under test runs in the real bash."""
    shim, calls = root / "bin", root / "bash_calls.txt"
    shim.mkdir()
    note = f'echo "MODEL=$MODEL MODELS=${{MODELS-unset}} README=${{README-unset}} $*" >> "{calls}"\n'
    fail = f'[ "$MODEL" = "{fail_on}" ] && exit 3\n' if fail_on else ""
    fail += '[ "$MODEL" = "slow" ] && exec sleep 60\n'
    (shim / "bash").write_text(f"#!/bin/sh\n{note}{fail}exit 0\n")
    (shim / "bash").chmod(0o755)
    return {"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}, calls


def test_models_runs_each_model_in_turn_then_table1_across_them(reproduced, tmp_path):
    root, _, _ = reproduced
    paper = root / "paper"
    # a second model's run: the tiny model's run again under another name (its index names the same summaries)
    index = json.loads((paper / "index_llama_7B_quick.json").read_text())
    (paper / "index_alpaca_7B_quick.json").write_text(json.dumps({**index, "model": "alpaca_7B"}))
    path, calls = _noting_bash(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# A project\n\n{BEGIN}\nold text\n{END}\n")
    env = {**os.environ, **path, "MODELS": "llama_7B alpaca_7B", "PAPER_DIR": str(paper), "README": str(readme)}
    proc = subprocess.run(
        [shutil.which("bash"), "reproduce.sh", "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each model's whole run, in turn, as `MODEL=<m> bash reproduce.sh` with the arguments; MODELS and README
    # do not reach it (the README is written once, on every model)
    assert calls.read_text().splitlines() == [
        f"MODEL={m} MODELS=unset README=unset reproduce.sh --device cpu" for m in ("llama_7B", "alpaca_7B")
    ]
    combined = (paper / "table1_models_quick.md").read_text()
    assert combined.count("| unintervened |") == 2 and combined.count("| SLIM |") == 2
    assert "| **llama_7B** | unintervened |" in combined and "| **alpaca_7B** | unintervened |" in combined
    record = json.loads((paper / "index_models_quick.json").read_text())
    assert record["models"] == ["llama_7B", "alpaca_7B"] and record["command"].startswith('MODELS="llama_7B alpaca_7B"')
    section = readme.read_text().split(BEGIN)[1].split(END)[0]
    assert "[table1_models_quick.md]" in section and "**llama_7B**: " in section and "**alpaca_7B**: " in section


def test_a_model_whose_run_fails_stops_models_in_one_line(tmp_path):
    path, calls = _noting_bash(tmp_path, fail_on="broken")
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "kept.md").write_text("an earlier artefact")
    env = {**os.environ, **path, "MODELS": "broken llama_7B", "PAPER_DIR": str(paper)}
    proc = subprocess.run([shutil.which("bash"), "reproduce.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: reproduce.sh stopped at model broken, whose run failed (above); the models before it are finished "
        "and a rerun reads back what every run finished."
    ]
    assert calls.read_text().splitlines() == ["MODEL=broken MODELS=unset README=unset reproduce.sh"]
    assert sorted(p.name for p in paper.iterdir()) == ["kept.md"]  # nothing written across models, nothing lost


def _ledger_after(tmp_path, model, stop=None):
    """reproduce.sh for one model whose stage 1 (run_pipeline.sh, through the noting bash) fails or sleeps until
    `stop` stops it; the lines of its stage-time ledger."""
    import time

    path, _ = _noting_bash(tmp_path)
    out = tmp_path / "validation"
    env = {**os.environ, **path, "MODEL": model, "NUM_HEADS": "4", "OUT_DIR": str(out), "PAPER_DIR": str(tmp_path)}
    proc = subprocess.Popen([shutil.which("bash"), "reproduce.sh"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if stop is not None:
        time.sleep(3)
        os.killpg(proc.pid, stop)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    return [line.split("\t") for line in (out / f"stage_seconds_{model}.tsv").read_text().splitlines()]


@pytest.mark.parametrize("stop", [None, "SIGTERM", "SIGINT"])
def test_a_run_that_stops_mid_stage_still_times_that_stage(tmp_path, stop):
    import signal

    model = "broken" if stop is None else "slow"
    lines = _ledger_after(tmp_path, model, None if stop is None else getattr(signal, stop))
    assert [(f[2], f[5]) for f in lines] == [("1/8", "interrupted")]
    assert lines[0][3].startswith("the pipeline") and lines[0][6].startswith(f'MODEL="{model}" ')
    if stop is not None:
        assert int(lines[0][4]) >= 2  # the seconds it ran before it was stopped


def outputs(folder):
    """Every file under `folder` as what a rerun must reproduce, by its path below `folder`: bytes, except where
    a run differs from the last by nature. safetensors: the tensors and the metadata (the header's key order
    differs from process to process) and no checksum sidecar; JSON: without times (`seconds`, `mtime_ns`, `date`);
    Markdown: without its `Date:` line. Lock files and the engine's logs aside."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if not p.is_file() or p.name.endswith((".lock", ".sha256.json")) or "logs" in p.relative_to(folder).parts:
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), "np") as f:
                meta = f.metadata()
            out[key] = (sorted((k, v.tobytes()) for k, v in load_file(str(p)).items()), meta)
        elif p.suffix == ".json":
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                data = {k: v for k, v in data.items() if k not in ("seconds", "mtime_ns", "date")}
            out[key] = data
        elif p.suffix == ".md":
            out[key] = [line for line in p.read_text().splitlines() if not line.startswith("Date: ")]
        else:
            out[key] = p.read_bytes()
    return out


def test_engine_ray_writes_what_the_sequential_run_wrote(reproduced):
    """ENGINE=ray (the sweeps' values and a stage's test runs as Ray tasks, on this machine) from nothing: the same
    answers, scores, summaries, policies, maps, tables and figures as the sequential run of the fixture, byte for
    byte but for what differs from run to run by nature (`outputs`). Runs last in this module: it moves that run's
    files aside."""
    root = reproduced[0]
    before = {}
    for name in ("validation", "paper"):
        before[name] = outputs(root / name)
        shutil.move(root / name, root / f"{name}_sequential")
    proc = run_reproduce(root, ENGINE="ray", ENGINE_WORKERS="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/1] llama_7B stage 1" in proc.stdout + proc.stderr  # the units ran as Ray tasks
    # measured times (Table 4, the index's wall time) differ by nature; tests above added a Table 1 across models
    timed = ("table4_", "index_", "table1_models_", "stage_seconds_")
    for name in ("validation", "paper"):
        after = outputs(root / name)
        want = {k: v for k, v in before[name].items() if not k.startswith(timed)}
        got = {k: v for k, v in after.items() if not k.startswith(timed)}
        assert sorted(got) == sorted(want), name
        assert [k for k in want if got[k] != want[k]] == [], name
