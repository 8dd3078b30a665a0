"""evaluate_method: what is answered, what is reused, what is written."""

import functools

import numpy as np
import pandas as pd
import torch

from conftest import HashEmbedder, LengthJudge, make_tokenizer, random_policy, tiny_model
from slim.config import EvalConfig
from slim.evaluation.evaluate import Scorers, evaluate_method, fold_average
from slim.layout import RunLayout, method_name
from slim.models.heads import model_shape
from slim.models.loading import LoadedModel
from slim.policies.base import model_fingerprint
from slim.policies.iti import ITIPolicy
from slim.policies.mimic import MimicPolicy


def test_which_policies_move_nothing():
    model = tiny_model("llama")
    fp, d = model_fingerprint(model), model_shape(model)[2]
    assert random_policy("slim", model, kappa=0.0).moves_nothing
    assert not random_policy("slim", model, kappa=1.0).moves_nothing
    # softmax of zeros still moves: 1 / votes
    assert not random_policy("slim", model, kappa=0.0, psi="softmax").moves_nothing
    assert ITIPolicy([[0, 1]], torch.ones(1, d), torch.ones(1), alpha=0.0, fingerprint=fp).moves_nothing
    assert not ITIPolicy([[0, 1]], torch.ones(1, d), torch.ones(1), alpha=1.0, fingerprint=fp).moves_nothing
    A, b = torch.eye(d).repeat(4, 1, 1), torch.zeros(4, d)
    assert MimicPolicy(A, b, layer=0, strength=0.0).moves_nothing and not MimicPolicy(A, b, layer=0).moves_nothing


def test_a_policy_that_moves_nothing_reuses_the_unintervened_answers(tmp_path):
    tokenizer = make_tokenizer()
    model = tiny_model("llama", max_positions=512)
    lm = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", device=torch.device("cpu"))
    questions = pd.DataFrame(
        {
            "Question": ["What is the capital of France ?", "who was it ?", "where is London ?", "It was yes ?"],
            "Correct Answers": ["Paris; It is Paris"] * 4,
            "Incorrect Answers": ["London; It is London"] * 4,
        }
    )
    folds = [{"test": np.array([0, 1, 2, 3]), "val": np.array([], int)}]
    scorers = Scorers(LengthJudge(), LengthJudge(), HashEmbedder(), ("stub", "stub"), "hash")
    layout = RunLayout(tmp_path, "tiny")
    cfg = EvalConfig(max_new_tokens=6, batch_size=2)
    run = functools.partial(evaluate_method, lm, questions, folds, scorers=scorers, cfg=cfg, layout=layout)

    baseline = run("baseline", {}, lambda fold: None)
    calls = []
    real = model.forward

    @functools.wraps(real)
    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    model.forward = counting
    noop = run("slim", {"kappa": 0.0}, lambda fold: random_policy("slim", model, kappa=0.0))
    assert not calls  # nothing answered: the unintervened answers were read back
    assert noop.rows[0]["answers_of"] == "baseline" and baseline.rows[0]["answers_of"] == "baseline"
    for key in ("true", "info", "sem", "degeneracy", "n_questions"):
        assert noop.mean[key] == baseline.mean[key]
    name = method_name("slim", {"kappa": 0.0})
    assert layout.answers(name, 0, "test").with_name(f"{name}_fold0_test_scored.csv").exists()
    assert not layout.answers(name, 0, "test").exists()

    moved = run("slim", {"kappa": 5.0}, lambda fold: random_policy("slim", model, kappa=5.0))
    name = method_name("slim", {"kappa": 5.0})
    assert calls and moved.rows[0]["answers_of"] == name and layout.answers(name, 0, "test").exists()


def three_questions():
    """Three questions in one test fold, and stub judges: (questions, folds, scorers)."""
    questions = pd.DataFrame(
        {
            "Question": ["What is the capital of France ?", "who was it ?", "where is London ?"],
            "Best Answer": ["Paris"] * 3,
            "Correct Answers": ["Paris; It is Paris"] * 3,
            "Incorrect Answers": ["London; It is London"] * 3,
        }
    )
    folds = [{"test": np.array([0, 1, 2]), "val": np.array([], int)}]
    return questions, folds, Scorers(LengthJudge(), LengthJudge(), HashEmbedder(), ("stub", "stub"), "hash")


def test_a_rerun_recomputes_no_likelihood_metric(tmp_path, monkeypatch):
    import slim.answering.likelihood

    tokenizer = make_tokenizer()
    model = tiny_model("llama", max_positions=512)
    lm = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", device=torch.device("cpu"))
    questions, folds, scorers = three_questions()
    layout = RunLayout(tmp_path, "tiny")
    cfg = EvalConfig(max_new_tokens=4, batch_size=2, mc=True, ce_kl=True)
    run = functools.partial(evaluate_method, lm, questions, folds, scorers=scorers, cfg=cfg, layout=layout)
    torch.manual_seed(0)
    policy = random_policy("slim", model, kappa=5.0)

    first = run("slim", {"kappa": 5.0}, lambda fold: policy)
    assert {"mc1", "mc2", "ce", "kl"} <= set(first.rows[0]) and first.rows[0]["firing_rate"] is not None

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(slim.answering.likelihood, "mc_scores", forbidden)
    monkeypatch.setattr(slim.answering.likelihood, "ce_and_kl", forbidden)
    again = run("slim", {"kappa": 5.0}, lambda fold: policy)  # every answer and metric read back
    for key in ("mc1", "mc2", "ce", "kl", "firing_rate", "true", "info"):
        assert again.rows[0][key] == first.rows[0][key]

    # another policy under the same name: its answers and metrics are made again, not reused
    other = random_policy("slim", model, kappa=5.0, psi="softmax")
    try:
        run("slim", {"kappa": 5.0}, lambda fold: other)
    except AssertionError as err:
        assert "recomputed" in str(err)
    else:
        raise AssertionError("metrics of another policy were reused")


def test_a_stop_after_decoding_keeps_the_firing_rate_and_a_fold_without_one_has_no_mean(tmp_path, monkeypatch):
    import slim.answering.likelihood

    model = tiny_model("llama", max_positions=512)
    lm = LoadedModel(model=model, tokenizer=make_tokenizer(), name="tiny", device=torch.device("cpu"))
    questions, folds, scorers = three_questions()
    cfg = EvalConfig(max_new_tokens=4, batch_size=2, mc=True)
    torch.manual_seed(0)
    policy = random_policy("slim", model, kappa=5.0)

    def run(folder):
        layout = RunLayout(tmp_path / folder, "tiny")
        return evaluate_method(lm, questions, folds, "slim", {"kappa": 5.0}, lambda fold: policy, scorers, cfg, layout)

    whole = run("whole").rows[0]["firing_rate"]
    assert whole is not None

    def stopped(*args, **kwargs):  # Ctrl-C while MC1/MC2 runs, after every answer was decoded
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(slim.answering.likelihood, "mc_scores", stopped)
        try:
            run("stopped")
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("MC1/MC2 did not run")
    assert run("stopped").rows[0]["firing_rate"] == whole  # the answers read back, the rate measured with them

    rows = [{"fold": 0, "true": 40.0, "firing_rate": 0.2}, {"fold": 1, "true": 50.0, "firing_rate": None}]
    mean = fold_average(rows)
    assert mean["true"] == 45.0 and mean["firing_rate"] is None  # not 0.2 under the folds' name


def test_short_memory_releases_the_subject_model_first_and_writes_the_same_files(tmp_path, monkeypatch):
    import importlib

    import slim.judges.local
    from slim.evaluation.evaluate import evaluate_methods

    ev = importlib.import_module("slim.evaluation.evaluate")  # the module: the package names its function evaluate

    tokenizer = make_tokenizer()
    questions = pd.DataFrame(
        {
            "Question": ["What is the capital of France ?", "who was it ?", "where is London ?", "It was yes ?"],
            "Best Answer": ["Paris"] * 4,
            "Correct Answers": ["Paris; It is Paris"] * 4,
            "Incorrect Answers": ["London; It is London"] * 4,
        }
    )
    folds = [{"test": np.array([0, 1]), "val": np.array([2, 3])}, {"test": np.array([2, 3]), "val": np.array([0, 1])}]
    cfg = EvalConfig(max_new_tokens=4, batch_size=2, mc=True)
    out = tmp_path / "out"

    def run(release: bool):
        model = tiny_model("llama", max_positions=512)
        lm = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", device=torch.device("cpu"))
        judged_without_model = []

        class Judge(LengthJudge):
            def score(self, questions, answers):
                judged_without_model.append(lm.model is None)
                return super().score(questions, answers)

        scorers = Scorers(Judge(), Judge(), HashEmbedder(), ("stub", "stub"), "hash")
        monkeypatch.setattr(ev, "load_scorers", lambda *args, **kwargs: scorers)
        monkeypatch.setattr(slim.judges.local, "release_subject_first", lambda judges: release)
        policies = {fold: random_policy("slim", model, kappa=5.0) for fold in range(2)}
        runs = [("baseline", {}, {}), ("slim", {"kappa": 5.0}, policies)]
        rows = []
        results = evaluate_methods(
            lm, questions, folds, runs, cfg, RunLayout(out, "tiny"), {"run": 1}, None, rows.append
        )
        return lm, judged_without_model, rows, results

    lm, judged_without_model, rows, results = run(release=False)
    assert lm.model is not None and judged_without_model == [False] * 8  # 2 runs x 2 folds x 2 judges
    kept = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    out.rename(tmp_path / "first")

    lm, judged_without_model, rows_released, released = run(release=True)
    assert lm.model is None and judged_without_model == [True] * 8  # every answer and MC score made before
    again = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert {p.suffix for p in kept} >= {".csv", ".json", ".safetensors"}
    assert again == kept  # the same files, byte for byte
    assert rows_released == rows and [r.mean for r in released] == [r.mean for r in results]
    assert {"mc1", "mc2", "firing_rate"} <= set(results[1].rows[0])
