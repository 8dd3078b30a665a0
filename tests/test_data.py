"""TruthfulQA loading (explicit folder, cache, checked download), probe texts and folds."""

import functools
import http.server
import shutil
import threading

import numpy as np
import pytest

from conftest import TQA_DIR
from slim import data
from slim.data import DataUnavailableError, find_truthfulqa_file, fold_split, load_truthfulqa, probe_texts


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
    assert texts.text[0] == f"Q: {first['Question']} A: {first['Correct Answers'][0]}"
    end_q = probe_texts(df, "tqa_gen_end_q")
    assert len(end_q) == len(texts)
    assert all(
        e.startswith(t + " Q: ") and not e.endswith(" Q: " + df.at[i, "Question"])
        for e, t, i in zip(end_q.text, texts.text, texts.question_idx)
    )
    with pytest.raises(ValueError, match="unknown dataset"):
        probe_texts(df, "tqa_mc3")


def test_fold_split_is_a_partition_and_reproducible():
    n = 817
    tests = []
    for fold in range(2):
        train, val, test = fold_split(n, 2, fold, val_ratio=0.2, seed=42)
        assert len(set(train) | set(val) | set(test)) == n
        assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
        assert len(train) == int((n - len(test)) * 0.8)
        tests.append(test)
        again = fold_split(n, 2, fold, val_ratio=0.2, seed=42)
        assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    np.testing.assert_array_equal(tests[0], np.arange(409))  # array_split: first part gets the extra row
    np.testing.assert_array_equal(tests[1], np.arange(409, 817))
    with pytest.raises(ValueError, match="num_fold"):
        fold_split(n, 1, 0)


def test_save_fold_splits(tmp_path):
    df = load_truthfulqa(TQA_DIR)
    written = data.save_fold_splits(df, tmp_path, num_fold=2)
    import pandas as pd

    test0 = pd.read_csv(written[0]["test"])
    assert test0["question_idx"].tolist() == list(range(409))
    assert test0["Question"][0] == df["Question"][0]
