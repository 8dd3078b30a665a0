"""Transfer to NQ-open (slim/transfer.py, transfer.py): gold match, the data, the recorded policies, end to end."""

import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, HashEmbedder, LengthJudge, make_tokenizer, random_policy, run, tiny_model
from slim.config import EvalConfig
from slim.evaluation.evaluate import Scorers, evaluate_method
from slim.layout import RunLayout, method_name
from slim.models.loading import LoadedModel
from slim.paper import nq_open
from slim.paper.nq_open import TransferUnavailable, data_key, gold_match, load_nq_open, normalize_answer
from slim.policies.base import Policy

# The published NQ-open dev split (../shared/data/nq_open/README.md), as CI points at it through SLIM_NQ_FILE
NQ_REAL = Path(os.environ.get("SLIM_NQ_FILE") or REPO.parent / "shared" / "data" / "nq_open" / "NQ-open.dev.jsonl")
needs_real = pytest.mark.skipif(
    not NQ_REAL.is_file(), reason=f"the NQ-open dev split is not at {NQ_REAL}: set SLIM_NQ_FILE to NQ-open.dev.jsonl"
)

NQ = [
    ("where is the capital of france", ["Paris"]),
    ("who was president of the united states in 1955", ["Dwight D. Eisenhower", "Eisenhower"]),
    ("when did it happen", ["1955"]),
    ("what is the capital of france", ["Paris", "the city of Paris"]),
    ("who were you", ["London"]),
    ("how do you eat seeds", ["Nothing happens"]),
]


def write_nq(path, rows=NQ):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


def test_gold_match_normalises_and_contains():
    assert normalize_answer("  The U.S. Army's  “Big” Red-One!  ") == "us armys big redone"
    assert normalize_answer("An apple a day") == "apple day"
    assert gold_match("It was Dwight D. Eisenhower, in 1955.", ["Eisenhower"])  # contained in a sentence
    assert gold_match("THE EIFFEL TOWER", ["Eiffel Tower"]) and gold_match("eiffel tower", "The Eiffel Tower")
    assert gold_match("Paris, France", ["london", "paris"])  # any gold answer
    assert not gold_match("It happened in 1955.", ["1"])  # whole words: "1" is not in "1955"
    assert not gold_match("a comparison", ["Paris"]) and not gold_match("", ["Paris"])
    assert not gold_match("the", ["The"])  # a gold answer that normalises to nothing never matches


@pytest.fixture
def no_local_nq(tmp_path, monkeypatch):
    """No SLIM_NQ_FILE and an empty cache, whatever the machine has: the lookup sees only what a test puts there."""
    monkeypatch.delenv("SLIM_NQ_FILE", raising=False)
    monkeypatch.setenv("SLIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "nq_open" / "NQ-open.dev.jsonl"


def test_load_nq_open_from_a_local_file(tmp_path, monkeypatch, no_local_nq):
    path = write_nq(tmp_path / "nq.jsonl")
    df = load_nq_open(path)
    assert list(df["question_idx"]) == list(range(6)) and df["Question"][1] == NQ[1][0]
    assert df["golds"][3] == ["Paris", "the city of Paris"]
    source = df.attrs["source"]
    assert source["file"] == str(path.resolve()) and len(source["sha256"]) == 64 and source["records"] == 6
    assert data_key(source) == f"file-{source['sha256'][:12]}"

    sub = load_nq_open(path, n=4, seed=3)  # the first 4 of a seeded shuffle, in file order, the same every time
    assert len(sub) == 4 and list(sub["question_idx"]) == sorted(sub["question_idx"])
    assert list(sub["question_idx"]) == list(load_nq_open(path, n=4, seed=3)["question_idx"])
    assert sub.attrs["source"]["subset"]["seed"] == 3

    # the same records as a JSON list and as CSV with the answer lists written as text (Hugging Face's to_csv)
    (tmp_path / "nq.json").write_text(json.dumps([{"question": q, "answer": a} for q, a in NQ]))
    pd.DataFrame({"question": [q for q, _ in NQ], "answer": [str(a) for _, a in NQ]}).to_csv(tmp_path / "nq.csv")
    for name in ("nq.json", "nq.csv"):
        other = load_nq_open(tmp_path / name)
        assert other["golds"].tolist() == df["golds"].tolist() and other["Question"].tolist() == df["Question"].tolist()

    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": []}) + "\n")
    with pytest.raises(ValueError, match="record 0: `answer` holds no gold answer"):
        load_nq_open(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="--nq_file names .*missing.jsonl, which does not exist"):
        load_nq_open(tmp_path / "missing.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `datasets` not installed (or offline): no file, no data
    with pytest.raises(TransferUnavailable, match="no --nq_file was given, SLIM_NQ_FILE is not set and .*cache"):
        load_nq_open()


def test_lookup_order_flag_then_variable_then_cache_then_online(tmp_path, monkeypatch, no_local_nq):
    flag, env = write_nq(tmp_path / "flag.jsonl", NQ[:2]), write_nq(tmp_path / "env.jsonl", NQ[:3])
    no_local_nq.parent.mkdir(parents=True)
    cached = write_nq(no_local_nq, NQ[:4])
    # the cache holds the published dev split: here the 4-record file stands in for it
    monkeypatch.setattr(nq_open, "NQ_DEV_SHA256", hashlib.sha256(cached.read_bytes()).hexdigest())
    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        return {"question": [q for q, _ in NQ], "answer": [a for _, a in NQ]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("SLIM_NQ_FILE", str(env))

    def source(df):
        return len(df), df.attrs["source"]["found_by"], df.attrs["source"].get("file")

    assert source(load_nq_open(flag)) == (2, "--nq_file", str(flag))  # the flag beats everything
    assert source(load_nq_open()) == (3, "SLIM_NQ_FILE", str(env))  # then the variable
    monkeypatch.setenv("SLIM_NQ_FILE", str(tmp_path))  # a folder: the dev split's file name inside it
    (tmp_path / "NQ-open.dev.jsonl").write_bytes(cached.read_bytes())
    assert source(load_nq_open()) == (4, "SLIM_NQ_FILE", str(tmp_path / "NQ-open.dev.jsonl"))
    monkeypatch.setenv("SLIM_NQ_FILE", " ")  # empty counts as not set: then the cache
    got = load_nq_open()
    assert source(got) == (4, "cache", str(cached)) and got.attrs["source"]["dev_split"] is True
    assert load_nq_open(flag).attrs["source"]["dev_split"] is False
    cached.unlink()  # then online, through `datasets`
    got = load_nq_open(split="validation")
    assert got.attrs["source"] == {"dataset": "nq_open", "split": "validation", "found_by": "online", "records": 6}
    assert asked == [("nq_open", "validation")] and got["golds"][1] == NQ[1][1]


def test_a_wrong_or_damaged_file_names_the_flag_or_variable(tmp_path, monkeypatch, no_local_nq, caplog, capsys):
    lines = [json.dumps({"question": q, "answer": a}) for q, a in NQ]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines)[: len(lines[0]) + len(lines[1]) + 20])  # cut short inside the third line
    monkeypatch.setenv("SLIM_NQ_FILE", str(cut))
    with pytest.raises(
        ValueError, match=r"^SLIM_NQ_FILE=\S+cut.jsonl could not be read .*line 3 is not JSON.*unset it"
    ):
        load_nq_open()
    monkeypatch.setenv("SLIM_NQ_FILE", str(tmp_path / "gone.jsonl"))
    with pytest.raises(ValueError, match=r"^SLIM_NQ_FILE names \S+gone.jsonl, which does not exist: point SLIM_NQ"):
        load_nq_open()
    wrong = tmp_path / "squad.jsonl"  # another data set's records
    wrong.write_text(json.dumps({"question": "q", "answers": {"text": ["a"]}}) + "\n")
    with pytest.raises(ValueError, match=r"^--nq_file \S+squad.jsonl has no answer field: pass --nq_file a file"):
        load_nq_open(wrong)

    monkeypatch.delenv("SLIM_NQ_FILE")
    no_local_nq.parent.mkdir(parents=True)
    write_nq(no_local_nq)  # not the published bytes: a damaged cache entry stops the run, it is not read
    with pytest.raises(ValueError, match=r"^the cached NQ-open file \S+ is damaged \(sha256 .*delete it and copy"):
        load_nq_open()
    own = write_nq(tmp_path / "NQ-open.dev.jsonl")  # named like the dev split but not it: used, and said once
    with caplog.at_level("WARNING", logger="slim.paper.nq_open"):
        assert len(load_nq_open(own)) == 6
    assert [r.getMessage() for r in caplog.records if "differs from the published NQ-open.dev.jsonl" in r.getMessage()]

    # through the script: one line naming the variable, exit status 2, nothing written
    summary = baseline_summary(tmp_path)
    out = tmp_path / "paper" / "transfer.md"
    monkeypatch.setenv("SLIM_NQ_FILE", str(tmp_path / "gone.jsonl"))
    script = transfer_script()
    with pytest.raises(SystemExit) as exit_:
        script.su.run_main(lambda: script.main([str(summary), "--out", str(out)]), flags={"nq_file": "--nq_file"})
    assert exit_.value.code == 2 and not out.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: SLIM_NQ_FILE names \S+gone.jsonl, which does not exist", lines[0])


@needs_real
def test_reads_the_shared_nq_open_dev_split():
    raw = NQ_REAL.read_bytes()
    records = [json.loads(line) for line in raw.decode("utf-8").splitlines()]  # read here, independently
    df = load_nq_open(NQ_REAL)
    assert len(df) == len(records) == 3610 and list(df["question_idx"]) == list(range(3610))
    assert df["Question"].tolist() == [r["question"].strip() for r in records]
    assert all(q for q in df["Question"]) and all(g and all(a.strip() for a in g) for g in df["golds"])
    source = df.attrs["source"]
    assert source["sha256"] == hashlib.sha256(raw).hexdigest() == nq_open.NQ_DEV_SHA256 and source["dev_split"]
    assert source["records"] == 3610 and source["bytes"] == len(raw) and "subset" not in source
    # every record's first gold answer, said in a sentence, is a gold match (normalisation holds on the real data)
    assert all(gold_match(f"I think it is {g[0]}.", g) for g in df["golds"] if normalize_answer(g[0]))

    quick = load_nq_open(NQ_REAL, n=100, seed=0)  # quick mode: the first 100 of a permutation seeded by 0
    want = sorted(np.random.default_rng(0).permutation(3610)[:100])
    assert list(quick["question_idx"]) == want and quick.attrs["source"]["subset"] == {
        "n": 100, "seed": 0, "rule": "the first n of a seeded permutation (numpy default_rng)"
    }  # fmt: skip
    assert quick["Question"].tolist() == [records[i]["question"] for i in want]


def transfer_script():
    spec = importlib.util.spec_from_file_location("transfer_script", REPO / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_summary(root):
    """A TruthfulQA summary of the unintervened model alone, with its config: enough for transfer.py to start."""
    summary = root / "summary" / "tiny_baseline_test.json"
    summary.parent.mkdir()
    summary.write_text("[]")
    (root / "summary" / "tiny_baseline_test.config.json").write_text(json.dumps({"method": "baseline"}))
    return summary


def test_offline_without_a_file_writes_a_note_and_exits_cleanly(tmp_path, monkeypatch, capsys, no_local_nq):
    summary = baseline_summary(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    out = tmp_path / "paper" / "transfer.md"
    transfer_script().main([str(summary), "--out", str(out)])  # returns: run_main exits 0
    note = out.read_text()
    assert "could not run" in note and "--nq_file" in note and "`datasets`" in note
    assert "SLIM_NQ_FILE=PATH" in note and str(no_local_nq) in note  # every way to have it offline is named
    assert json.loads(out.with_suffix(".json").read_text())["status"] == "not run"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not run" in lines[0]

    # a report that ran is kept: a rerun where the data cannot be had does not replace it with a note
    out.with_suffix(".json").write_text(json.dumps({"status": "ran"}))
    out.write_text("the earlier results")
    transfer_script().main([str(summary), "--out", str(out)])
    assert out.read_text() == "the earlier results" and "earlier report" in capsys.readouterr().out


def test_evaluation_records_where_each_folds_policy_lives(tmp_path):
    model = tiny_model("llama", max_positions=512)
    lm = LoadedModel(model=model, tokenizer=make_tokenizer(), name="tiny", device=torch.device("cpu"))
    questions = pd.DataFrame(
        {"Question": ["What is the capital of France ?", "who was it ?"], "Correct Answers": ["Paris"] * 2}
    ).assign(**{"Incorrect Answers": ["London"] * 2})
    folds = [{"test": np.array([0]), "val": np.array([], int)}, {"test": np.array([1]), "val": np.array([], int)}]
    scorers = Scorers(LengthJudge(), LengthJudge(), HashEmbedder(), ("stub", "stub"), "hash")
    layout = RunLayout(tmp_path, "tiny")
    run = functools.partial(
        evaluate_method, lm, questions, folds, scorers=scorers, cfg=EvalConfig(max_new_tokens=3), layout=layout
    )

    def config(result):
        return json.loads(result.summary_json.with_name(result.summary_json.stem + ".config.json").read_text())

    assert "policy_dirs" not in config(run("baseline", {}, lambda fold: None))
    saved = random_policy("slim", model).save(tmp_path / "mine")  # fold 0: a saved policy, read back
    loaded, fresh = Policy.load(saved), random_policy("iti", model)  # fold 1: never saved
    assert loaded.folder_ == saved
    result = run("mix", {"k": 1.0}, {0: loaded, 1: fresh}.get)
    recorded = config(result)
    canonical = tmp_path / "policies" / "tiny" / f"{method_name('mix', {'k': 1.0})}_fold1"
    assert recorded["policy_dirs"] == {"0": str(saved.resolve()), "1": str(canonical.resolve())}
    assert recorded["policy_digests"] == {"0": loaded.digest(), "1": fresh.digest()}
    assert Policy.load(canonical).digest() == fresh.digest()


def test_transfer_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "tiny_llama"
    tiny_model("llama", vocab_size=len(make_tokenizer())).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out_dir = tmp_path / "validation"
    judges = ["--judge_name", f"local:{model_dir}", "--info_name", f"local:{model_dir}"]
    common = ["--model_dir", str(model_dir), "--device", "cpu", *judges, "--max_new_tokens", "4"]
    run(
        ["validate_2fold.py", "llama_7B", *common, "--num_fold", "2", "--out_dir", str(out_dir), "--n_questions",
         "40", "--num_heads", "4", "--alpha", "15", "--use_center_of_mass", "--tuning_dataset", "same",
         "--max_questions", "3", "--no_mc", "--no_ce_kl"],
        tmp_path,
    )  # fmt: skip
    summary = out_dir / "summary" / "tiny_llama_first40_iti_alpha15_heads4_dircom_test_max3.json"
    config = json.loads(summary.with_name(summary.stem + ".config.json").read_text())
    assert sorted(config["policy_dirs"]) == ["0", "1"]

    out = tmp_path / "paper" / "transfer.md"
    real = NQ_REAL.is_file()  # the shared dev split found through SLIM_NQ_FILE; elsewhere 6 questions by --nq_file
    if real:
        nq_path, data, env = NQ_REAL.resolve(), ["--max_questions", "6"], {"SLIM_NQ_FILE": str(NQ_REAL)}
    else:
        nq_path = write_nq(tmp_path / "nq.jsonl").resolve()
        data, env = ["--nq_file", str(nq_path)], {"SLIM_NQ_FILE": ""}
    records = [json.loads(line) for line in nq_path.read_text(encoding="utf-8").splitlines()]
    # the answer sets, named; one answered alone (as reproduce.sh's units do) is read back by the report, not redone
    script = transfer_script()
    script.main([str(summary), "--list_answer_sets"])
    names = capsys.readouterr().out.split()
    stem = summary.stem.removeprefix("tiny_llama_first40_").removesuffix("_test_max3")
    assert names == ["baseline", f"{stem}_fold0", f"{stem}_fold1"]
    with pytest.raises(ValueError, match="--answer_set iti_fold7: pick one of baseline, "):
        script.main([str(summary), *data, "--answer_set", "iti_fold7"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    script.main([str(summary), *data, *common, "--answer_set", names[2]])
    alone = capsys.readouterr().out.splitlines()[-1]
    assert alone.startswith(f"answer set {names[2]}: 6 answers in ") and not out.exists()
    alone_csv = Path(alone.rsplit(" in ", 1)[1])
    assert sorted(f.name for f in alone_csv.parent.glob("*.csv")) == [f"{names[2]}.csv"]  # that set, unscored
    alone_mtime = os.stat(alone_csv).st_mtime_ns

    args = ["transfer.py", str(summary), *data, "--out", str(out)]
    res = run([*args, *common], tmp_path, env=env)
    assert "transfer report" in res.stdout
    text = out.read_text()
    assert "small-model results" in text.lower() and f"`{nq_path}`" in text
    assert f"sha256 `{hashlib.sha256(nq_path.read_bytes()).hexdigest()}`" in text
    assert ("found by `SLIM_NQ_FILE`" if real else "found by `--nq_file`") in text
    if real:
        assert "the published NQ-open dev split" in text and "6 of 3,610 questions, the first 6 of a perm" in text
    cell = r"\d+\.\d \(\d+\.\d to \d+\.\d\)"
    for method, fold in [("baseline", "-"), ("iti", "0"), ("iti", "1"), ("iti", "mean")]:
        assert re.search(rf"\| {method} \| [^|]+ \| {re.escape(fold)} \| 6 \| {cell} \|", text), (method, fold)
    assert re.search(r"\| iti \| alpha = 15 \| mean \| 6 \| [-+]\d+\.\d \([-+]\d+\.\d to [-+]\d+\.\d\); p ", text)
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["status"] == "ran" and numbers["questions"] == 6 and numbers["judges"]["truth"].startswith("local:")
    assert len(numbers["rows"]) == 4 and len(numbers["paired"]) == 3
    for row in numbers["rows"]:
        for key in ("gold_match", "true", "info", "true_info"):
            value, lo, hi = row[key]
            assert lo <= value <= hi
    files = [*numbers["answer_files"].values()]
    assert len(files) == 3 and all(len(pd.read_csv(f)) == 6 for f in files)
    assert numbers["answer_files"][names[2]] == str(alone_csv) and os.stat(alone_csv).st_mtime_ns == alone_mtime
    assert numbers["data"]["found_by"] == ("SLIM_NQ_FILE" if real else "--nq_file")
    assert numbers["data"]["dev_split"] is real and numbers["small_model"] is True

    # the questions asked are the file's records the seeded subset names, and gold match is theirs
    want = sorted(np.random.default_rng(0).permutation(len(records))[:6]) if real else list(range(6))
    base = pd.read_csv(numbers["answer_files"]["baseline"], keep_default_na=False, dtype={"answer": str})
    base = base.sort_values("question_idx")  # written in answering order
    assert base["question_idx"].tolist() == want
    assert base["question"].tolist() == [records[i]["question"] for i in want]
    hits = [gold_match(a, records[i]["answer"]) for i, a in zip(want, base["answer"])]
    assert numbers["rows"][0]["name"] == "baseline" and numbers["rows"][0]["gold_match"][0] == pytest.approx(
        100 * np.mean(hits)
    )

    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    again = run([*args, *common], tmp_path, env=env)  # a second run answers nothing again: no file is rewritten
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes and "transfer report" in again.stdout
