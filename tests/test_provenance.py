"""Judges' identities: what each judge reports, the summary rows that record them, and the tables and sweeps
that refuse to compare results of different judges."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, TQA_DIR, make_tokenizer, tiny_model
from slim.data.truthfulqa import load_truthfulqa
from slim.evaluation.evaluate import Scorers, evaluate, split_questions
from slim.evaluation.metrics import check_same_judges, read_summary, write_summary
from slim.evaluation.reports import comparison_table, judges_note
from slim.evaluation.sweep import main as sweep_main
from slim.judges import Judge, LocalLMJudge, OfflineJudge, OpenAIJudge, make_judge

KEY = "sk-test-DO-NOT-LEAK-777"


class StubJudge(Judge):
    def __init__(self, kind: str, identity: str):
        self.kind, self.name, self._id = kind, "stub", identity

    @property
    def identity(self) -> str:
        return self._id

    def score(self, questions, answers):
        return np.full(len(list(answers)), 0.7)


class HashEmbedder:
    def encode(self, texts):
        return np.array([[len(t) + 1.0, t.count(" ") + 1.0, 1.0] for t in texts])


def offline_judge(tmp_path, seed=3):
    judge = OfflineJudge("truth", tqa_dir=TQA_DIR, cache_dir=tmp_path, embedder=object(), embedder_name="none")
    rng = np.random.default_rng(seed)
    for mlp in judge.mlps:  # every cross-fitted MLP, on random features (no embedder needed)
        mlp.epochs = 1
        mlp.fit(rng.standard_normal((40, 28)).astype(np.float32), np.arange(40) % 2)
    return judge


def test_offline_identity_is_a_sha256_of_its_weights(tmp_path, monkeypatch):
    judge = offline_judge(tmp_path)
    in_memory = judge.identity  # fitted, not saved yet
    assert in_memory.startswith("offline@sha256:") and len(in_memory) == len("offline@sha256:") + 16
    path = judge.save(tmp_path / "judge.safetensors")
    judge.save(path)  # saved again: the file may differ (safetensors orders its metadata at random) ...
    assert judge.identity == in_memory  # ... but the same judge

    fresh = OfflineJudge("truth", tqa_dir=TQA_DIR, cache_dir=tmp_path, embedder=object(), embedder_name="none")
    monkeypatch.setattr(fresh, "model_path", lambda: path)
    monkeypatch.setattr(fresh, "fit", lambda *a: pytest.fail("a saved judge is loaded, not trained"))
    assert fresh.identity == in_memory  # loaded on first use, the same file

    other = offline_judge(tmp_path / "other", seed=4)
    other.save(tmp_path / "other.safetensors")
    assert other.identity != in_memory


def test_local_identity_hashes_the_folder_or_names_the_revision(tmp_path):
    tokenizer = make_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    folder = tmp_path / "a" / "judge"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("notes do not change the verdicts")
    judge = make_judge(f"local:{folder}", "truth")
    assert judge.identity.startswith("local:judge@sha256:") and len(judge.identity.split("sha256:")[1]) == 16

    copy = tmp_path / "b" / "judge"
    shutil.copytree(folder, copy)
    (copy / "README.md").write_text("other notes")
    assert LocalLMJudge(str(copy), "truth").identity == judge.identity  # same files, elsewhere
    config = copy / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-3}))
    assert LocalLMJudge(str(copy), "truth").identity != judge.identity

    in_memory = LocalLMJudge("org/judge", "info", model=model, tokenizer=tokenizer)
    assert in_memory.identity.startswith("local:org/judge@sha256:")
    model.config._commit_hash = "0123abcd"  # what transformers records for a hub download
    assert (
        LocalLMJudge("org/judge", "info", model=model, tokenizer=tokenizer).identity == "local:org/judge@rev:0123abcd"
    )


def test_openai_identity_is_the_model_and_host_never_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    judge = OpenAIJudge("ft:davinci-002:org::abc", "truth", cache_path=tmp_path / "v.json")
    assert judge.identity == "openai:ft:davinci-002:org::abc"
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://user:{KEY}@127.0.0.1:8080/v1?key={KEY}")
    assert judge.identity == "openai:ft:davinci-002:org::abc@127.0.0.1:8080"
    assert OpenAIJudge("m", "info", cache_path=tmp_path / "v.json", base_url="https://api.example.org/v1").identity == (
        "openai:m@api.example.org"
    )


def test_a_summary_row_records_its_judges_identities(tmp_path):
    tokenizer = make_tokenizer()
    lm = SimpleNamespace(model=tiny_model("llama", vocab_size=len(tokenizer)), tokenizer=tokenizer)
    questions = split_questions(load_truthfulqa(TQA_DIR), np.array([0, 1]), None)
    scorers = Scorers(
        StubJudge("truth", "offline@sha256:aaaa"),
        StubJudge("info", "offline@sha256:bbbb"),
        HashEmbedder(),
        ("offline", "offline"),
        "hash",
    )
    row = evaluate(lm, questions, None, "baseline", {}, 0, "test", tmp_path / "answers.csv", scorers, max_new_tokens=2)
    assert row["judge"] == "offline" and row["judge_id"] == "offline@sha256:aaaa"
    assert row["info_judge_id"] == "offline@sha256:bbbb" and row["true"] == 100.0
    write_summary([row, dict(row, fold="mean")], json_path=tmp_path / "s.json")
    assert read_summary(tmp_path / "s.json")[1]["judge_id"] == "offline@sha256:aaaa"


def summary(path, method, judge_id=None, info_id="offline@sha256:info", judge="offline", **knob):
    row = {"method": method, "model": "m", "true": 50.0, "info": 80.0, "true_info": 40.0, "sem": 0.5}
    row.update(degeneracy=0.0, n_questions=10, judge=judge, info_judge="offline", **knob)
    if judge_id:
        row.update(judge_id=judge_id, info_judge_id=info_id)
    write_summary([dict(row, fold=0), dict(row, fold="mean")], json_path=path)
    return str(path)


def test_the_table_refuses_different_judges_and_notes_unrecorded_ones(tmp_path):
    a = summary(tmp_path / "a.json", "slim", "offline@sha256:1111", kappa=40.0)
    b = summary(tmp_path / "b.json", "iti", "offline@sha256:2222", alpha=2.0)
    with pytest.raises(ValueError, match="different truth judges \\(offline@sha256:1111 and offline@sha256:2222\\)"):
        comparison_table([a, b])
    proc = subprocess.run(
        [sys.executable, "-m", "slim.evaluation.reports", a, b], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith(f"error: {a} and {b} were scored by different truth judges")

    same = summary(tmp_path / "c.json", "iti", "offline@sha256:1111", alpha=2.0)
    old = summary(tmp_path / "old.json", "baseline")  # written before identities were recorded
    table = comparison_table([a, same, old])
    note = judges_note(table)
    assert note.startswith("Judges: truth `offline@sha256:1111`, info `offline@sha256:info`.")
    assert "Judge identity not recorded for baseline (" in note and "offline / offline by name" in note
    assert "iti" not in note.split("not recorded")[1]

    other_name = summary(tmp_path / "api.json", "baseline", judge="openai:gpt-judge")  # no identity, another judge
    with pytest.raises(ValueError, match="different truth judges \\(offline and openai:gpt-judge\\)"):
        comparison_table([a, other_name])
    assert check_same_judges([{"judge": "offline"}, {}], ["x", "y"]) == [0, 1]


def test_the_sweep_refuses_to_choose_from_different_judges(tmp_path, capsys):
    k0 = summary(tmp_path / "k0.json", "slim", "offline@sha256:1111", kappa=0.0)
    k5 = summary(tmp_path / "k5.json", "slim", "offline@sha256:1111", info_id="offline@sha256:other", kappa=5.0)
    with pytest.raises(ValueError, match=f"{k0} and {k5} were scored by different info judges"):
        sweep_main(["--param", "kappa", k0, k5])
    k5 = summary(tmp_path / "k5.json", "slim", kappa=5.0)  # rescored before identities: by name only
    assert sweep_main(["--param", "kappa", k0, k5])["kappa"] in (0.0, 5.0)
    assert "judge identity not recorded in 1 of 2 summaries" in capsys.readouterr().out
