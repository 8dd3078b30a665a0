"""Question order before the folds (mc, shuffle, csv), the published split draws, and what records them."""

import argparse
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

import slim_utils as su
from conftest import TQA_DIR
from slim.config import DataConfig, ParameterError, run_config
from slim.data import probe_texts
from slim.data.folds import mc_order, questions_and_folds, resolve_question_order
from slim.data.truthfulqa import DataUnavailableError, load_truthfulqa
from slim.evaluation.evaluate import split_questions

N = 817


@pytest.fixture(scope="module")
def csv_df():
    return load_truthfulqa(TQA_DIR)


def interleaved_rows(df: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """CSV rows with the two question types interleaved in proportion, each type shuffled within itself:
    a stand-in for mc_task.json, which mixes the types (not present on this offline machine)."""
    rng = np.random.default_rng(seed)
    adversarial = df["Type"].eq("Adversarial").to_numpy()
    rank = np.empty(len(df))
    for mask in (adversarial, ~adversarial):
        rows = rng.permutation(np.flatnonzero(mask))
        rank[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    return np.argsort(rank, kind="stable")


def write_mc_task(folder, questions: list[str]):
    """An mc_task.json as TruthfulQA publishes it: a list of {question, mc1_targets, mc2_targets}."""
    items = [{"question": q, "mc1_targets": {"Yes.": 1, "No.": 0}, "mc2_targets": {"Yes.": 1}} for q in questions]
    (folder / "mc_task.json").write_text(json.dumps(items))
    return folder / "mc_task.json"


@pytest.fixture
def mc_dir(tmp_path, csv_df):
    """A TruthfulQA folder with the CSV and a synthetic mc_task.json: questions with a stray space (as the
    published files have), and the first repeated at the end (the order is that of first appearance)."""
    folder = tmp_path / "tqa"
    folder.mkdir()
    shutil.copy(TQA_DIR / "TruthfulQA.csv", folder / "TruthfulQA.csv")
    rows = interleaved_rows(csv_df)
    questions = [csv_df.at[r, "Question"] + " " for r in rows]
    write_mc_task(folder, [*questions, questions[0]])
    return folder, rows


def adversarial_share(df, idx) -> float:
    return float(df.loc[idx, "Type"].eq("Adversarial").mean())


def cfg_for(order, folder=None, **kw) -> DataConfig:
    return DataConfig(tqa_dir=str(folder or TQA_DIR), question_order=order, **kw)


@pytest.mark.parametrize("order", ["mc", "shuffle"])
def test_mc_and_shuffle_orders_mix_question_types_in_every_fold(order, mc_dir, csv_df):
    folder = mc_dir[0] if order == "mc" else TQA_DIR
    df, folds = questions_and_folds(cfg_for(order, folder))
    overall = adversarial_share(df, df.index)
    for split in folds:
        assert sorted(np.concatenate(list(split.values()))) == list(range(N))  # a partition of all the questions
        for name in ("train", "test"):
            assert abs(adversarial_share(df, split[name]) - overall) < 0.03, (order, name)
        assert 0 < adversarial_share(df, split["val"]) < 1  # the small val part has both types too
    # the file order does not: fold 0 tests on Adversarial questions only
    _, csv_folds = questions_and_folds(cfg_for("csv"))
    assert adversarial_share(df, csv_folds[0]["test"]) == 1.0


def test_mc_order_is_the_files_order_of_first_appearance(mc_dir, csv_df):
    folder, rows = mc_dir
    np.testing.assert_array_equal(mc_order(csv_df["Question"].tolist(), folder), rows)
    _, folds = questions_and_folds(cfg_for("mc", folder))
    np.testing.assert_array_equal(folds[0]["test"], rows[:409])  # test of fold k: the k-th part of the order
    np.testing.assert_array_equal(folds[1]["test"], rows[409:])


@pytest.mark.parametrize(
    "content, says",
    [
        ("wrong question", "does not hold TruthfulQA.csv's 817 questions (1 missing, 1 not in the CSV)"),
        ("not json", "is not TruthfulQA's mc_task.json (JSONDecodeError"),
        ("no question key", "is not TruthfulQA's mc_task.json (KeyError"),
    ],
)
def test_an_mc_file_without_the_csvs_questions_is_a_one_line_error(content, says, mc_dir, csv_df):
    folder, rows = mc_dir
    questions = [csv_df.at[r, "Question"] for r in rows]
    if content == "wrong question":
        write_mc_task(folder, [*questions[:-1], "Is this a TruthfulQA question?"])
    elif content == "not json":
        (folder / "mc_task.json").write_text("{ cut short")
    else:
        (folder / "mc_task.json").write_text(json.dumps([{"text": q} for q in questions]))
    with pytest.raises(DataUnavailableError) as err:
        questions_and_folds(cfg_for("mc", folder))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{folder / 'mc_task.json'} {says}"), message
    assert message.endswith("or pass --question_order shuffle.")


def test_mc_when_the_file_is_missing_says_where_and_what_else(tmp_path):
    folder = tmp_path / "tqa"
    folder.mkdir()
    shutil.copy(TQA_DIR / "TruthfulQA.csv", folder / "TruthfulQA.csv")
    with pytest.raises(DataUnavailableError) as err:
        questions_and_folds(cfg_for("mc", folder))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{folder / 'mc_task.json'} does not exist")
    assert message.endswith("or pass --question_order shuffle.")


def test_auto_is_mc_when_the_file_is_at_hand_else_shuffle_with_a_notice(mc_dir, tmp_path, monkeypatch, caplog):
    folder = mc_dir[0]
    assert resolve_question_order("auto", folder) == "mc"
    assert resolve_question_order("auto", folder / "TruthfulQA.csv") == "mc"  # a CSV passed directly: its folder
    clone = tmp_path / "clone"  # a clone of the public repository: data/mc_task.json
    (clone / "data").mkdir(parents=True)
    shutil.copy(folder / "mc_task.json", clone / "data" / "mc_task.json")
    assert resolve_question_order("auto", clone) == "mc"
    assert resolve_question_order("csv", folder) == "csv"  # an explicit choice stands

    assert resolve_question_order("auto", TQA_DIR) == "shuffle"
    with caplog.at_level(logging.INFO, logger="slim.data"):
        questions_and_folds(cfg_for("auto"))
    notes = [r for r in caplog.records if "shuffled order" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO  # a notice, not a warning
    assert "\n" not in notes[0].getMessage() and f"mc_task.json into {TQA_DIR}" in notes[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slim.data"):
        questions_and_folds(cfg_for("auto", folder))
    assert not [r for r in caplog.records if "shuffled order" in r.getMessage()]

    # without an explicit folder the cache is looked at (never downloaded by default)
    monkeypatch.delenv("SLIM_TQA_DIR", raising=False)
    monkeypatch.setenv("SLIM_CACHE", str(tmp_path / "cache"))
    assert resolve_question_order("auto") == "shuffle"
    (tmp_path / "cache" / "truthfulqa").mkdir(parents=True)
    shutil.copy(folder / "mc_task.json", tmp_path / "cache" / "truthfulqa" / "mc_task.json")
    assert resolve_question_order("auto") == "mc"


@pytest.mark.parametrize("order", ["mc", "shuffle", "csv"])
def test_splits_repeat_with_a_seed_and_change_with_another(order, mc_dir):
    folder = mc_dir[0] if order == "mc" else TQA_DIR
    _, first = questions_and_folds(cfg_for(order, folder, seed=42))
    _, again = questions_and_folds(cfg_for(order, folder, seed=42))
    _, other = questions_and_folds(cfg_for(order, folder, seed=7))
    for a, b, c in zip(first, again, other):
        assert all(np.array_equal(a[s], b[s]) for s in a)
        assert not np.array_equal(a["val"], c["val"])


def test_fold_1s_validation_draw_continues_fold_0s_stream(mc_dir):
    """The published scripts: np.random.seed(seed) once, then np.random.choice for each fold in turn."""
    folder, rows = mc_dir
    _, folds = questions_and_folds(cfg_for("mc", folder, seed=42, val_ratio=0.2))
    parts = np.array_split(np.arange(N), 2)  # positions in the mc order
    np.random.seed(42)
    train0 = np.random.choice(parts[1], size=int(len(parts[1]) * 0.8), replace=False)
    train1 = np.random.choice(parts[0], size=int(len(parts[0]) * 0.8), replace=False)
    for split, train, rest in zip(folds, (train0, train1), (parts[1], parts[0])):
        assert set(split["train"]) == set(rows[train])
        assert set(split["val"]) == set(rows[rest]) - set(rows[train])
    fresh = np.random.RandomState(42).choice(parts[0], size=int(len(parts[0]) * 0.8), replace=False)
    assert set(folds[1]["train"]) != set(rows[fresh])  # a restarted stream would draw another split


def test_csv_order_reproduces_the_old_splits():
    """This project's splits before the question order existed: file order, a fresh RandomState per fold."""
    _, folds = questions_and_folds(cfg_for("csv", seed=42, val_ratio=0.2))
    for fold, split in enumerate(folds):
        parts = np.array_split(np.arange(N), 2)
        rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
        train = np.sort(np.random.RandomState(42).choice(rest, size=int(len(rest) * 0.8), replace=False))
        np.testing.assert_array_equal(split["train"], train)
        np.testing.assert_array_equal(split["val"], np.setdiff1d(rest, train))
        np.testing.assert_array_equal(split["test"], parts[fold])


@pytest.mark.parametrize("order", ["mc", "shuffle"])
def test_n_questions_are_the_first_in_the_order(order, mc_dir, csv_df):
    folder, rows = mc_dir
    folder = folder if order == "mc" else TQA_DIR
    first = rows[:40] if order == "mc" else np.random.default_rng(42).permutation(N)[:40]
    df, folds = questions_and_folds(cfg_for(order, folder, n_questions=40))
    assert list(df.index) == sorted(first)  # indexed by CSV row, rows in CSV order
    assert (df["Question"] == csv_df.loc[df.index, "Question"]).all()
    assert 0 < adversarial_share(df, df.index) < 1
    np.testing.assert_array_equal(folds[0]["test"], first[:20])
    assert sorted(np.concatenate(list(folds[1].values()))) == sorted(first)
    # downstream reads the subset by CSV row: the split's questions and the probe texts
    qs = split_questions(df, folds[1]["test"], None)
    assert qs["question_idx"].tolist() == sorted(first[20:])
    assert (qs["Question"] == csv_df.loc[qs["question_idx"], "Question"].to_numpy()).all()
    end_q = probe_texts(df, "tqa_gen_end_q")
    assert set(end_q["question_idx"]) == set(first)


def test_split_files_record_the_order_and_seed(mc_dir, tmp_path):
    folder = mc_dir[0]
    df, folds = questions_and_folds(cfg_for("mc", folder, seed=3), tmp_path / "splits")
    for fold, split in enumerate(folds):
        for name, idx in split.items():
            saved = pd.read_csv(tmp_path / "splits" / f"fold_{fold}_{name}_seed_3.csv")
            assert saved["question_idx"].tolist() == idx.tolist()  # in the split's (mc) order
            assert (saved["question_order"] == "mc").all() and (saved["seed"] == 3).all()
            assert saved["Question"].tolist() == df.loc[idx, "Question"].tolist()
    # auto is written as the order it stands for
    questions_and_folds(cfg_for("auto", TQA_DIR, seed=3), tmp_path / "auto")
    assert set(pd.read_csv(tmp_path / "auto" / "fold_0_test_seed_3.csv")["question_order"]) == {"shuffle"}


def test_the_flag_maps_to_a_recorded_config(mc_dir):
    parser = su.add_flags(argparse.ArgumentParser(), su.COMMON_FLAGS)
    base = ["--model_dir", "unused", "--device", "cpu"]
    for flags, expected in [
        ([], "shuffle"),  # auto, and no mc_task.json beside the shared CSV
        (["--tqa_dir", str(mc_dir[0])], "mc"),
        (["--question_order", "csv"], "csv"),
        (["--question_order", "shuffle", "--tqa_dir", str(mc_dir[0])], "shuffle"),
    ]:
        cfg = su.data_config(parser.parse_args([*base, *flags]))
        assert cfg.question_order == expected, flags
        assert run_config(data=cfg)["data"]["question_order"] == expected  # saved with every run's config
    with pytest.raises(ParameterError, match="question_order must be one of auto, mc, shuffle, csv"):
        DataConfig(question_order="random")
