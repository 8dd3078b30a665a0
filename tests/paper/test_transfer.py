"""Transfer to NQ-open (slim/transfer.py, transfer.py): gold match, the data, the recorded policies, end to end."""

import functools
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, HashEmbedder, LengthJudge, make_tokenizer, random_policy, run, tiny_model
from slim.config import EvalConfig
from slim.evaluation.evaluate import Scorers, evaluate_method
from slim.layout import RunLayout, method_name
from slim.models.loading import LoadedModel
from slim.paper.nq_open import TransferUnavailable, data_key, gold_match, load_nq_open, normalize_answer
from slim.policies.base import Policy

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


def test_load_nq_open_from_a_local_file(tmp_path, monkeypatch):
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
    with pytest.raises(ValueError, match="does not exist"):
        load_nq_open(tmp_path / "missing.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `datasets` not installed (or offline): no file, no data
    with pytest.raises(TransferUnavailable, match="no --nq_file"):
        load_nq_open()


def transfer_script():
    spec = importlib.util.spec_from_file_location("transfer_script", REPO / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_without_a_file_writes_a_note_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary" / "tiny_baseline_test.json"
    summary.parent.mkdir()
    summary.write_text("[]")
    (tmp_path / "summary" / "tiny_baseline_test.config.json").write_text(json.dumps({"method": "baseline"}))
    monkeypatch.setitem(sys.modules, "datasets", None)
    out = tmp_path / "paper" / "transfer.md"
    transfer_script().main([str(summary), "--out", str(out)])  # returns: run_main exits 0
    note = out.read_text()
    assert "could not run" in note and "--nq_file" in note and "`datasets`" in note
    assert json.loads(out.with_suffix(".json").read_text())["status"] == "not run"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not run" in lines[0]


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


def test_transfer_end_to_end_on_a_tiny_model(tmp_path):
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
    args = ["transfer.py", str(summary), "--nq_file", str(write_nq(tmp_path / "nq.jsonl")), "--out", str(out)]
    res = run([*args, *common], tmp_path)
    assert "transfer report" in res.stdout
    text = out.read_text()
    assert "small-model results" in text.lower() and "nq.jsonl" in text and "sha256" in text
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

    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    again = run([*args, *common], tmp_path)  # a second run answers nothing again: no answer file is rewritten
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes and "transfer report" in again.stdout
