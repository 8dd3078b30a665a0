"""TruthfulQA loading (explicit folder, cache, checked download), probe texts and folds (see also
test_question_order.py)."""

import functools
import http.server
import inspect
import json
import shutil
import threading

import numpy as np
import pandas as pd
import pytest

from conftest import TQA_DIR
from slim.config import DataConfig
from slim.data import folds as data
from slim.data import probe_texts
from slim.data.activations import load_cached_activations
from slim.data.folds import draw_folds, mc_order
from slim.data.probe_texts import PROBE_TEXT_FORMAT, text_format, with_final_punctuation
from slim.data.truthfulqa import DataUnavailableError, find_truthfulqa_file, load_truthfulqa


@pytest.fixture
def file_server(tmp_path):
    """A static HTTP server on 127.0.0.1 laid out like the public repository."""
    root = tmp_path / "www"
    (root / "data").mkdir(parents=True)
    shutil.copy(TQA_DIR / "TruthfulQA.csv", root / "TruthfulQA.csv")
    shutil.copy(TQA_DIR / "finetune_truth.jsonl", root / "data" / "finetune_truth.jsonl")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_is_checked_cached_and_reused(file_server, tmp_path, monkeypatch):
    root, url = file_server
    monkeypatch.delenv("SLIM_TQA_DIR", raising=False)
    cache = tmp_path / "cache"
    got = find_truthfulqa_file("TruthfulQA.csv", base_url=url, cache_dir=cache)
    assert got == cache / "TruthfulQA.csv" and got.read_bytes() == (TQA_DIR / "TruthfulQA.csv").read_bytes()
    got = find_truthfulqa_file("finetune_truth.jsonl", base_url=url, cache_dir=cache)
    assert got.parent == cache

    (root / "TruthfulQA.csv").unlink()  # the server no longer has it: the cache must serve it
    assert find_truthfulqa_file("TruthfulQA.csv", base_url=url, cache_dir=cache) == cache / "TruthfulQA.csv"


def test_corrupted_download_is_rejected_and_leaves_nothing(file_server, tmp_path, monkeypatch):
    root, url = file_server
    monkeypatch.delenv("SLIM_TQA_DIR", raising=False)
    with open(root / "TruthfulQA.csv", "ab") as f:
        f.write(b"tampered\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataUnavailableError, match="checksum") as err:
        find_truthfulqa_file("TruthfulQA.csv", base_url=url, cache_dir=cache)
    assert "\n" not in str(err.value)
    assert list(cache.iterdir()) == []


def test_unreachable_source_says_how_to_provide_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIM_TQA_DIR", raising=False)
    with pytest.raises(DataUnavailableError, match="SLIM_TQA_DIR") as err:
        find_truthfulqa_file("TruthfulQA.csv", base_url="http://127.0.0.1:9/", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DataUnavailableError, match="does not exist"):
        find_truthfulqa_file("TruthfulQA.csv", path=tmp_path)


def test_env_var_and_probe_texts(monkeypatch):
    monkeypatch.setenv("SLIM_TQA_DIR", str(TQA_DIR))
    df = load_truthfulqa()
    assert len(df) == 817
    assert df["Question"].str.strip().eq(df["Question"]).all()
    texts = probe_texts(df, "tqa_mc2")
    n_true = sum(len(a) for a in df["Correct Answers"])
    n_false = sum(len(a) for a in df["Incorrect Answers"])
    assert len(texts) == n_true + n_false
    assert texts["truthful"].sum() == n_true and (texts["label"] == 1 - texts["truthful"]).all()
    first = df.iloc[0]
    assert texts.text[0] == f"Q: {first['Question']} A: {first['Correct Answers'][0]}."  # closed, as published
    end_q = probe_texts(df, "tqa_gen_end_q")
    assert len(end_q) == len(texts)
    assert all(
        e.startswith(t + " Q: ") and not e.endswith(" Q: " + df.at[i, "Question"])
        for e, t, i in zip(end_q.text, texts.text, texts.question_idx)
    )
    with pytest.raises(ValueError, match="unknown dataset"):
        probe_texts(df, "tqa_mc3")


def test_probe_texts_end_with_final_punctuation():
    assert with_final_punctuation("Nothing happens") == "Nothing happens."
    assert with_final_punctuation(" Legal in the Netherlands (with restrictions) ") == (
        "Legal in the Netherlands (with restrictions)."
    )
    assert with_final_punctuation('It means "goat"') == 'It means "goat".'
    for closed in ("Is it?", "Fortune cookies originated in the U.S.", 'He said "I think..."', 'It means "goat."'):
        assert with_final_punctuation(closed) == closed
    assert with_final_punctuation('She said, "You can see Russia from my house!"').endswith('!"')
    df = load_truthfulqa(TQA_DIR)
    texts = probe_texts(df, "tqa_mc2")
    assert texts.text.str.contains(r"""[.!?\u2026]["'\u2019\u201d)\]]*$""").all()
    assert texts.text.str.endswith(".").mean() > 0.99
    end_q = probe_texts(df, "tqa_gen_end_q")
    assert all(e.startswith(t + " Q: ") for e, t in zip(end_q.text, texts.text))
    plain = probe_texts(df, "tqa_mc2_plain")  # the ablation: the CSV's answers as they are
    assert plain.text.str.endswith(".").mean() < 0.5 and all(t.startswith(p) for p, t in zip(plain.text, texts.text))
    assert (plain[["question_idx", "label"]] == texts[["question_idx", "label"]]).all().all()


def test_activation_cache_records_the_closed_format():
    """The activation cache's manifest records PROBE_TEXT_FORMAT: texts without the period are another cache."""
    assert PROBE_TEXT_FORMAT != "Q: {question} A: {answer}"  # the format before answers were closed
    assert "final_punctuation" in PROBE_TEXT_FORMAT
    assert inspect.signature(load_cached_activations).parameters["text_format"].default == PROBE_TEXT_FORMAT
    assert text_format("tqa_mc2") == PROBE_TEXT_FORMAT and text_format("tqa_mc2_plain") == "Q: {question} A: {answer}"


def test_draw_folds_is_a_partition_and_reproducible():
    n = 817
    order = np.random.default_rng(0).permutation(n)
    folds = draw_folds(order, 2, val_ratio=0.2, seed=42)
    for fold, split in enumerate(folds):
        train, val, test = split["train"], split["val"], split["test"]
        assert sorted(np.concatenate([train, val, test])) == list(range(n))
        assert len(train) == int((n - len(test)) * 0.8)
        again = draw_folds(order, 2, val_ratio=0.2, seed=42)[fold]
        assert all(np.array_equal(split[s], again[s]) for s in split)
        position = {q: i for i, q in enumerate(order)}
        for idx in split.values():
            assert [position[q] for q in idx] == sorted(position[q] for q in idx)  # listed in the order
    np.testing.assert_array_equal(folds[0]["test"], order[:409])  # array_split: first part gets the extra row
    np.testing.assert_array_equal(folds[1]["test"], order[409:])
    with pytest.raises(ValueError, match="num_fold"):
        draw_folds(order, 1)


def test_save_fold_splits(tmp_path):
    df = load_truthfulqa(TQA_DIR)
    folds = data.make_folds(np.arange(len(df)), DataConfig(question_order="csv"))
    written = data.save_fold_splits(df, folds, tmp_path, "csv", 42)
    test0 = pd.read_csv(written[0]["test"])
    assert test0["question_idx"].tolist() == list(range(409))
    assert test0["Question"][0] == df["Question"][0]
    assert set(test0["question_order"]) == {"csv"} and set(test0["seed"]) == {42}
    assert test0["Correct Answers"][0] == "; ".join(df["Correct Answers"][0])


def test_mc_task_download_is_checked_by_its_questions(file_server, tmp_path, monkeypatch):
    """mc_task.json has no pinned sha256 (none could be learnt offline): a download is kept only when its
    questions are the CSV's, and it is never fetched without that check."""
    root, url = file_server
    monkeypatch.delenv("SLIM_TQA_DIR", raising=False)
    questions = load_truthfulqa(TQA_DIR)["Question"].tolist()
    items = [{"question": q, "mc1_targets": {"A.": 1}} for q in reversed(questions)]
    (root / "data" / "mc_task.json").write_text(json.dumps(items[:-1] + [{"question": "Not a TruthfulQA question?"}]))
    cache = tmp_path / "cache"
    with pytest.raises(DataUnavailableError) as err:
        mc_order(questions, base_url=url, cache_dir=cache)
    assert "\n" not in str(err.value) and "does not hold TruthfulQA.csv's 817 questions" in str(err.value)
    assert "the copy was discarded" in str(err.value) and list(cache.iterdir()) == []

    (root / "data" / "mc_task.json").write_text(json.dumps(items))
    np.testing.assert_array_equal(mc_order(questions, base_url=url, cache_dir=cache), np.arange(817)[::-1])
    assert (cache / "mc_task.json").is_file()
    (root / "data" / "mc_task.json").unlink()  # the cached copy serves from now on
    np.testing.assert_array_equal(mc_order(questions, base_url=url, cache_dir=cache), np.arange(817)[::-1])
    with pytest.raises(ValueError, match="no pinned sha256"):
        find_truthfulqa_file("mc_task.json", cache_dir=cache)
