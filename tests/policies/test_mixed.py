"""The paper's Table 2 arms (slim.policies.mixed):

SLIM's intervention on ITI's heads, ITI's intervention on SLIM's layer.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tokenizer, tiny_model
from slim.answering.decoding import generate_greedy
from slim.config import ITIConfig, SlimConfig
from slim.data.activations import ProbeData
from slim.policies.base import Policy, model_fingerprint
from slim.policies.head_maps import fit_head_map
from slim.policies.mixed import (
    ITIOnSlimLayerPolicy,
    SlimOnITIHeadsPolicy,
    iti_on_slim_layer_for_fold,
    slim_on_iti_heads_for_fold,
)
from slim.stage1.fit import FoldProbes

L, H, D = 3, 4, 8  # the tiny Llama's layers, heads, head size
PROMPTS = ["Q: What is the capital of France ?", "Q: who was it ? A:"]
HEADS = [[1, 3], [0, 1], [1, 0], [2, 2]]  # (layer, head), in ITI's rank order: layers out of order on purpose


def random_slim_on_heads(kappa, fingerprint=None, bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = len(HEADS)
    A = torch.eye(D) + 0.5 * torch.randn(K, D, D, generator=g)
    return SlimOnITIHeadsPolicy(
        HEADS,
        torch.randn(K, D, generator=g),
        bias + 0.3 * torch.randn(K, generator=g),
        A,
        torch.randn(K, D, generator=g),
        kappa=kappa,
        fingerprint=fingerprint,
    )


def random_iti_on_layer(alpha, tau, fingerprint=None, bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(H, D, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    return ITIOnSlimLayerPolicy(
        torch.randn(H, D, generator=g),
        bias + 0.3 * torch.randn(H, generator=g),
        directions,
        0.5 + torch.rand(H, generator=g),
        layer=1,
        tau=tau,
        alpha=alpha,
        fingerprint=fingerprint,
    )


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama", vocab_size=len(make_tokenizer())), make_tokenizer()


@pytest.mark.parametrize("arm", ["slim_on_iti_heads", "iti_on_slim_layer"])
def test_strength_zero_generates_the_unintervened_tokens(model_and_tokenizer, arm):
    model, tokenizer = model_and_tokenizer
    fp = model_fingerprint(model)
    # bias 3: the probes vote (and the layer fires) at almost every token, so only the strength stops the edit
    if arm == "slim_on_iti_heads":
        zero, strong = (random_slim_on_heads(k, fp, bias=3.0) for k in (0.0, 3.0))
    else:
        zero, strong = (random_iti_on_layer(a, tau=1, fingerprint=fp, bias=3.0) for a in (0.0, 20.0))
    plain = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert zero.moves_nothing and not strong.moves_nothing
    assert generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=8, edit=zero) == plain
    assert generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=8, edit=strong) != plain  # the edit is live


def test_slim_on_iti_heads_moves_the_chosen_heads_where_their_probe_votes():
    policy = random_slim_on_heads(kappa=2.5)
    assert policy.layers == [0, 1, 2]
    a = torch.randn(16, H, D, generator=torch.Generator().manual_seed(5))  # (n, H, d)
    voted, silent = 0, 0
    for layer in policy.layers:
        new = policy.move(layer, a)
        for i in range(len(a)):
            for h in range(H):
                if [layer, h] not in HEADS:
                    assert torch.equal(new[i, h], a[i, h])  # not an ITI head: untouched
                    continue
                k = HEADS.index([layer, h])
                p = torch.sigmoid(policy.weight[k] @ a[i, h] + policy.bias[k])
                if p <= 0.5:
                    silent += 1
                    assert torch.equal(new[i, h], a[i, h])  # its probe does not vote: untouched
                    continue
                voted += 1
                target = policy.A[k] @ a[i, h] + policy.b[k]
                torch.testing.assert_close(new[i, h], a[i, h] + 2.5 * p * (target - a[i, h]), atol=1e-5, rtol=1e-5)
    assert voted and silent, "the example should have voting and silent heads"
    assert policy.move(1, a.half()).dtype == torch.float16  # the model's dtype is kept


def test_iti_on_slim_layer_moves_only_when_the_layer_fires_by_alpha_sigma_direction():
    policy = random_iti_on_layer(alpha=4.0, tau=2)
    a = torch.randn(32, H, D, generator=torch.Generator().manual_seed(3))
    p = torch.sigmoid(torch.einsum("nhd,hd->nh", a, policy.weight) + policy.bias)
    votes = p > 0.5
    fired = votes.sum(-1) >= 2
    assert fired.any() and (~fired & votes.any(-1)).any(), "the example should have rows that fire and rows that vote"
    policy.reset_counts()
    new = policy.move(1, a)
    shift = 4.0 * policy.sigmas[:, None] * policy.directions  # (H, d)
    for i in range(len(a)):
        for h in range(H):
            if fired[i] and votes[i, h]:
                torch.testing.assert_close(new[i, h] - a[i, h], shift[h], atol=1e-6, rtol=1e-5)
            else:
                assert torch.equal(new[i, h], a[i, h])  # silent head, or a layer that did not fire
    assert policy.firing_rate() == pytest.approx(fired.float().mean().item())
    assert policy.layers == [1]


@pytest.mark.parametrize("make", [lambda fp: random_slim_on_heads(1.5, fp), lambda fp: random_iti_on_layer(3, 2, fp)])
def test_saved_and_reloaded_policy_is_the_same(model_and_tokenizer, tmp_path, make):
    model, tokenizer = model_and_tokenizer
    policy = make(model_fingerprint(model))
    policy.meta = {"note": "kept"}
    loaded = Policy.load(policy.save(tmp_path / policy.kind))
    assert type(loaded) is type(policy) and loaded.params() == policy.params() and loaded.meta == policy.meta
    assert loaded.digest() == policy.digest()
    for name in policy.tensor_names:
        assert torch.equal(getattr(loaded, name), getattr(policy, name))
    before = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=5, edit=policy)
    assert generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=5, edit=loaded) == before


def test_bad_inputs_are_refused(model_and_tokenizer):
    fp = model_fingerprint(model_and_tokenizer[0])
    t = torch.zeros(2, D)
    with pytest.raises(ValueError, match="name a .layer, head. pair twice"):
        SlimOnITIHeadsPolicy([[1, 2], [1, 2]], t, torch.zeros(2), torch.zeros(2, D, D), t, kappa=1.0)
    with pytest.raises(ValueError, match=r"head \(3, 0\) is out of range"):
        SlimOnITIHeadsPolicy([[3, 0], [1, 2]], t, torch.zeros(2), torch.zeros(2, D, D), t, kappa=1.0, fingerprint=fp)
    with pytest.raises(ValueError, match="inconsistent tensors"):
        SlimOnITIHeadsPolicy([[0, 0]], t, torch.zeros(2), torch.zeros(2, D, D), t, kappa=1.0)
    with pytest.raises(ValueError, match="kappa must be"):
        SlimOnITIHeadsPolicy([[0, 0], [0, 1]], t, torch.zeros(2), torch.zeros(2, D, D), t, kappa=-1.0)
    w = torch.zeros(H, D)
    with pytest.raises(ValueError, match="tau must lie in 0..4"):
        ITIOnSlimLayerPolicy(w, torch.zeros(H), w, torch.ones(H), layer=1, tau=5, alpha=1.0)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        ITIOnSlimLayerPolicy(w, torch.zeros(H), w, torch.ones(H), layer=3, tau=1, alpha=1.0, fingerprint=fp)


# -----------------------------------------------------------------------------
# fitting per fold, against hand computations on random activations

SPLIT = {"train": np.arange(8), "val": np.arange(8, 11), "test": np.arange(11, 14)}


@pytest.fixture(scope="module")
def fold_data(tmp_path_factory):
    """ProbeData of 14 questions x 8 texts (N, L, H, d), the test questions' rows far off, and random probes."""
    rng = np.random.default_rng(0)
    questions = np.repeat(np.arange(14), 8)
    truthful = np.tile([1, 1, 1, 1, 0, 0, 0, 0], 14)
    acts = rng.standard_normal((len(questions), L, H, D))
    acts[truthful == 0] += 0.7  # the classes differ
    acts[questions >= 11] = 50.0  # the test questions: any use of them would show
    texts = pd.DataFrame({"question_idx": questions, "truthful": truthful, "label": 1 - truthful})
    data = ProbeData(texts, acts.astype(np.float16), "f")
    probes = FoldProbes(
        rng.standard_normal((L, H, D)).astype(np.float32),
        rng.standard_normal((L, H)).astype(np.float32) * 0.3,
        np.array([1, 2, 3]),
        [],
        tmp_path_factory.mktemp("probes") / "fold0.safetensors",
    )
    return data, probes


def test_slim_on_iti_heads_maps_are_slims_maps_of_those_heads(fold_data, tmp_path):
    data, probes = fold_data
    cfg = SlimConfig(gamma=0.1, kappa=7.0, cov="ledoit_wolf")
    policy = slim_on_iti_heads_for_fold(data, SPLIT, probes, HEADS, cfg, lambda l: tmp_path / f"maps{l}.st")
    assert policy.kappa == 7.0 and policy.heads.tolist() == HEADS
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".st") == ["maps0.st", "maps1.st", "maps2.st"]
    rows = np.sort(data.rows_of(np.r_[SPLIT["train"], SPLIT["val"]]))
    moved = 0
    for k, (l, h) in enumerate(HEADS):
        a = np.asarray(data.activations[rows, l, h], dtype=np.float64)  # (N_fit, d), train+val only
        flagged = a @ probes.weight[l, h] + probes.bias[l, h] > 0
        hand = fit_head_map(a[flagged], probes.weight[l, h], probes.bias[l, h], 0.1, min_samples=10, cov="ledoit_wolf")
        np.testing.assert_allclose(policy.A[k].numpy(), hand.A, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(policy.b[k].numpy(), hand.b, rtol=1e-4, atol=1e-5)
        assert torch.equal(policy.weight[k], torch.as_tensor(probes.weight[l, h]))
        assert policy.meta["maps"][k]["layer"] == l and policy.meta["maps"][k]["head"] == h
        moved += hand.info["status"] == "moved"
    assert moved, "the example should move some head"
    again = slim_on_iti_heads_for_fold(data, SPLIT, probes, HEADS, cfg, lambda l: tmp_path / f"maps{l}.st")
    assert again.digest() == policy.digest()  # read back from the cache


@pytest.mark.parametrize("direction", ["com", "probe"])
def test_iti_on_slim_layer_shifts_are_itis_of_that_layer(fold_data, direction):
    data, probes = fold_data
    tuning = ProbeData(data.texts, data.activations[::-1].copy(), "t")  # other texts of the same questions
    cfg = ITIConfig(num_heads=1, alpha=2.0, direction=direction, tuning_dataset="tqa_gen_end_q")
    policy = iti_on_slim_layer_for_fold(data, SPLIT, probes, 2, cfg, tuning=tuning)
    assert (policy.layer, policy.tau, policy.alpha) == (2, 3, 2.0)
    assert torch.equal(policy.weight, torch.as_tensor(probes.weight[2]))
    fit_rows = np.sort(data.rows_of(np.r_[SPLIT["train"], SPLIT["val"]]))
    tuning_rows = np.sort(tuning.rows_of(np.r_[SPLIT["train"], SPLIT["val"]]))
    truthful = data.texts["truthful"].to_numpy()[fit_rows]
    for h in range(H):
        a = np.asarray(data.activations[fit_rows, 2, h], dtype=np.float64)
        if direction == "com":
            vec = a[truthful == 1].mean(0) - a[truthful == 0].mean(0)
            vec /= np.linalg.norm(vec)
            np.testing.assert_allclose(policy.directions[h].numpy(), vec, rtol=1e-5, atol=1e-6)
        vec = policy.directions[h].numpy().astype(np.float64)
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
        sigma = np.std(np.asarray(tuning.activations[tuning_rows, 2, h], dtype=np.float64) @ vec)
        assert float(policy.sigmas[h]) == pytest.approx(sigma, rel=1e-5)
    assert len(policy.meta["val_accuracy"]) == H and policy.meta["tuning_dataset"] == "tqa_gen_end_q"


# -----------------------------------------------------------------------------
# the script


def test_the_script_runs_both_arms_end_to_end(tmp_path):
    from conftest import common, eval_flags, run
    from slim.evaluation.reports import comparison_table

    model_dir = tmp_path / "tiny_llama"
    tiny_model("llama", vocab_size=len(make_tokenizer())).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    written = tmp_path / "written.txt"
    flags = [*common(tmp_path, model_dir), *eval_flags(model_dir), "--n_questions", "12", "--use_mode", "val"]
    flags += ["--epochs", "5", "--tuning_dataset", "same", "--summary_out", str(written)]
    out, policies = tmp_path / "validation", tmp_path / "validation" / "policies" / "tiny_llama_first12"

    def arm_run(*args, check=True):
        return run(["mixed_arms.py", "llama_7B", *flags, *args], tmp_path, check=check)

    def written_rows():
        return json.loads(Path(written.read_text().strip()).read_text())

    summaries = []
    for arm, knob in [
        ("slim_on_iti_heads", ["--kappa", "2", "--num_heads", "3"]),
        ("iti_on_slim_layer", ["--alpha", "5"]),
    ]:
        assert arm in arm_run("--arm", arm, *knob).stdout
        summaries.append(written.read_text().strip())
        assert summaries[-1].startswith(str(out / "summary" / f"tiny_llama_first12_{arm}_"))
        rows = written_rows()
        assert [r["fold"] for r in rows] == [0, 1, "mean"] and rows[-1]["method"] == arm
        assert rows[0]["answers_of"] != "baseline"
        folders = sorted(policies.glob(f"{arm}_*_fold*"))
        assert len(folders) == 2 and Policy.load(folders[0]).kind == arm
    assert rows[0]["firing_rate"] is not None  # iti_on_slim_layer reports its detector's firing rate
    loaded = Policy.load(next(policies.glob("slim_on_iti_heads_*_fold0")))
    assert len(loaded.heads) == 3 and loaded.kappa == 2.0
    assert comparison_table(summaries)["setting"].tolist() == ["kappa = 2", "alpha = 5"]

    arm_run("--arm", "slim_on_iti_heads", "--kappa", "0", "--num_heads", "3")
    assert [r["answers_of"] for r in written_rows()[:2]] == ["baseline", "baseline"]  # moves nothing: reused
    bad = arm_run("--arm", "slim_on_iti_heads", "--gamma", "0.7", check=False)
    assert bad.returncode == 2 and "--gamma must lie in (0, 0.5)" in bad.stderr
