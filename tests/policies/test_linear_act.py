"""Linear-AcT: the per-dimension affine fit of the sorted-sample OT map, the support rule, and the policy on a tiny
random Llama (generation, save/load, the script)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tokenizer, tiny_model
from slim.answering.decoding import generate_greedy
from slim.config import ParameterError
from slim.data.activations import ProbeData
from slim.models.heads import HeadTrace
from slim.policies.base import Policy, model_fingerprint
from slim.policies.linear_act import LinearActPolicy, _quantiles, fit_linear_act, linear_act_for_fold

PROMPTS = ["Q: What is the capital of France ?", "Q: who was it ? A:"]


def polyfit_maps(acts, labels, layers):
    """omega, beta (len(layers), H, d) by np.polyfit on each dimension's matched quantiles, computed on its own."""
    src, tgt = acts[labels == 1], acts[labels == 0]
    n = min(len(src), len(tgt))
    levels = np.linspace(0, 1, n)
    omega, beta = np.zeros((len(layers), *acts.shape[2:])), np.zeros((len(layers), *acts.shape[2:]))
    for i, layer in enumerate(layers):
        for h, j in np.ndindex(acts.shape[2:]):
            s = np.sort(src[:, layer, h, j]) if len(src) == n else np.quantile(src[:, layer, h, j], levels)
            t = np.sort(tgt[:, layer, h, j]) if len(tgt) == n else np.quantile(tgt[:, layer, h, j], levels)
            omega[i, h, j], beta[i, h, j] = np.polyfit(s, t, 1)
    return omega, beta


@pytest.mark.parametrize("n_src, n_tgt", [(40, 40), (25, 60), (70, 31)])
def test_fitted_map_is_the_least_squares_line_through_the_sorted_pairs(n_src, n_tgt):
    rng = np.random.default_rng(n_src + n_tgt)
    labels = np.r_[np.ones(n_src, int), np.zeros(n_tgt, int)]
    rng.shuffle(labels)
    acts = rng.standard_normal((len(labels), 3, 2, 5))  # (N, L, H, d)
    acts[labels == 0] = 2.0 * acts[labels == 0] ** 3 + 1.0  # a target that is not an affine image of the source
    policy = fit_linear_act(acts, labels, layers=[0, 2], strength=0.5)
    omega, beta = polyfit_maps(acts, labels, [0, 2])
    np.testing.assert_allclose(policy.omega.numpy(), omega, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(policy.beta.numpy(), beta, rtol=1e-5, atol=1e-5)
    src = acts[labels == 1][:, [0, 2]]
    np.testing.assert_allclose(policy.lo.numpy(), src.min(0), rtol=1e-6)
    np.testing.assert_allclose(policy.hi.numpy(), src.max(0), rtol=1e-6)
    assert policy.layers == [0, 2] and policy.meta["n_source"] == n_src and policy.meta["n_target"] == n_tgt


@pytest.mark.parametrize("m, n", [(5, 3), (101, 37), (300, 299), (10, 2), (2, 2), (64, 64)])
def test_matched_quantiles_are_numpys_bit_for_bit(m, n):
    """_quantiles (one sort) against np.quantile's "linear" method (a partition per position): the same bits,
    on continuous samples and on samples full of ties, so fitted maps and policy digests did not move."""
    rng = np.random.default_rng(m * 1000 + n)
    for x in (rng.standard_normal((m, 40)), rng.integers(0, 3, size=(m, 40)).astype(np.float64)):
        want = np.sort(x, axis=0) if m == n else np.quantile(x, np.linspace(0.0, 1.0, n), axis=0)
        got = _quantiles(x, n)
        assert got.shape == want.shape and np.array_equal(got.view(np.int64), want.view(np.int64))


def test_only_the_given_rows_are_fitted_and_a_fold_never_sees_its_test_questions():
    rng = np.random.default_rng(0)
    questions = np.repeat(np.arange(10), 6)  # 6 probe texts per question
    labels = np.tile([1, 1, 1, 0, 0, 0], 10)
    acts = rng.standard_normal((60, 2, 2, 3)).astype(np.float16)
    split = {"train": np.arange(6), "val": np.arange(6, 8), "test": np.arange(8, 10)}
    acts[questions >= 8] = 1000.0  # the test questions' activations: they would change every map and range
    data = ProbeData(pd.DataFrame({"question_idx": questions, "label": labels}), acts, "f")
    fold = linear_act_for_fold(data, split, layers=[1])
    rows = np.flatnonzero(questions < 8)
    alone = fit_linear_act(acts[rows], labels[rows], layers=[1])
    for name in ("omega", "beta", "lo", "hi"):
        assert torch.equal(getattr(fold, name), getattr(alone, name))
    assert float(fold.hi.max()) < 100


def test_outside_the_source_range_nothing_moves_inside_it_moves_by_lambda():
    omega = torch.tensor([[[2.0, -1.0, 0.5]]])  # (L_edit = 1, H = 1, d = 3)
    beta = torch.tensor([[[1.0, 0.0, -2.0]]])
    lo, hi = torch.full((1, 1, 3), -1.0), torch.full((1, 1, 3), 1.0)
    policy = LinearActPolicy(omega, beta, lo, hi, layers=[4], strength=0.25)
    a = torch.tensor([[[0.5, -1.0, 1.0]], [[1.5, -3.0, 0.0]], [[-1.01, 0.9, 7.0]]])  # (n = 3, H = 1, d = 3)
    new = policy.move(4, a)
    inside = (a >= -1) & (a <= 1)  # the bounds belong to the support
    expected = torch.where(inside, a + 0.25 * (omega[0] * a + beta[0] - a), a)
    torch.testing.assert_close(new, expected)
    assert torch.equal(new[~inside], a[~inside]) and not torch.equal(new[inside], a[inside])
    assert inside.any() and (~inside).any()
    half = policy.move(4, a.half())  # the model's dtype is kept
    assert half.dtype == torch.float16 and torch.equal(half[~inside], a.half()[~inside])


def all_token_activations(model, tokenizer) -> np.ndarray:
    """Every position's activations (n, L, H, d) of a few prompts: a support that generation falls into."""
    enc = tokenizer(PROMPTS + ["yes no London Paris", "I have no comment ."], return_tensors="pt", padding=True)
    with HeadTrace(model, record="all") as trace:
        model(**enc)
    keep = enc["attention_mask"].bool()
    return torch.stack([trace.activations[l][keep] for l in trace.layers], dim=1).numpy()


@pytest.fixture(scope="module")
def fitted():
    """A tiny Llama, its tokenizer and a Linear-AcT policy at lambda 1 whose target is far from its source."""
    model, tokenizer = tiny_model("llama", vocab_size=len(make_tokenizer())), make_tokenizer()
    source = all_token_activations(model, tokenizer)
    acts = np.concatenate([source, 4.0 * source + 1.0])
    labels = np.r_[np.ones(len(source), int), np.zeros(len(source), int)]
    return model, tokenizer, fit_linear_act(acts, labels, strength=1.0, fingerprint=model_fingerprint(model))


def at_strength(policy, strength):
    return LinearActPolicy(
        policy.omega, policy.beta, policy.lo, policy.hi, policy.layers, strength, policy.fingerprint, policy.meta
    )


def test_lambda_zero_generates_the_unintervened_tokens_and_lambda_one_does_not(fitted):
    model, tokenizer, policy = fitted
    plain = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=8)
    zero = at_strength(policy, 0.0)
    assert zero.moves_nothing and not policy.moves_nothing
    assert generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=8, edit=zero) == plain
    assert generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=8, edit=policy) != plain
    assert policy.layers == [0, 1, 2]  # every layer by default


def test_saved_and_reloaded_policy_is_the_same(fitted, tmp_path):
    model, tokenizer, policy = fitted
    loaded = Policy.load(policy.save(tmp_path / "linear_act"))
    assert type(loaded) is LinearActPolicy and loaded.params() == policy.params() == {
        "layers": [0, 1, 2],
        "strength": 1,
    }
    assert loaded.digest() == policy.digest() == at_strength(policy, 1.0).digest()
    assert at_strength(policy, 0.5).digest() != policy.digest()
    for name in LinearActPolicy.tensor_names:
        assert torch.equal(getattr(loaded, name), getattr(policy, name))
    before = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=6, edit=policy)
    assert generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=6, edit=loaded) == before


def test_bad_inputs_are_refused(fitted):
    model, _, policy = fitted
    with pytest.raises(ParameterError, match=r"strength must lie in \[0, 1\]"):
        at_strength(policy, 1.5)
    with pytest.raises(ValueError, match="both classes"):
        fit_linear_act(np.zeros((6, 1, 2, 2)), np.ones(6))
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        fit_linear_act(np.zeros((6, 3, 2, 2)), np.r_[np.ones(3), np.zeros(3)], layers=[3])
    fp = model_fingerprint(model)
    t = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        LinearActPolicy(t, t, t, t, layers=[9], fingerprint=fp)
    with pytest.raises(ValueError, match="must be distinct"):
        LinearActPolicy(t, t, t, t, layers=[0, 1])


def test_the_script_runs_end_to_end(tmp_path):
    from conftest import common, eval_flags, run

    model_dir = tmp_path / "tiny_llama"
    tiny_model("llama", vocab_size=len(make_tokenizer())).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    written = tmp_path / "written.txt"
    flags = [*common(tmp_path, model_dir), *eval_flags(model_dir), "--n_questions", "12", "--use_mode", "val"]
    res = run(
        ["linear_act.py", "llama_7B", *flags, "--strength", "0.5", "--layers", "2", "1", "--summary_out", str(written)],
        tmp_path,
    )
    summary = tmp_path / "validation" / "summary" / "tiny_llama_first12_linear_act_strength0.5_layers1-2_val_max3.json"
    assert written.read_text() == f"{summary}\n" and "linear_act" in res.stdout
    rows = json.loads(summary.read_text())
    assert (
        [r["fold"] for r in rows] == [0, 1, "mean"]
        and rows[-1]["strength"] == 0.5
        and rows[0]["answers_of"] != "baseline"
    )
    config = json.loads(summary.with_name(summary.stem + ".config.json").read_text())
    assert config["linear_act"]["layers"] == [1, 2]
    bad = run(["linear_act.py", "llama_7B", *flags, "--strength", "2"], tmp_path, check=False)
    assert bad.returncode == 2 and "--strength (strength) must lie in [0, 1]" in bad.stderr


def test_layers_on_two_devices_are_each_copied_once(fitted, monkeypatch):
    """A model spread over two devices (the CPU and meta here): each layer's tensors are copied to its device
    once, not again whenever the previous call was on the other device; the CPU layers move as before."""
    _, _, policy = fitted
    copied, original = [], torch.Tensor.to

    def to(self, *args, **kw):
        out = original(self, *args, **kw)
        if self.device != out.device:
            copied.append(out.device.type)
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    a = torch.randn(3, *policy.omega.shape[1:], generator=torch.Generator().manual_seed(2))  # (n, H, d)
    far = torch.empty_like(a, device="meta")
    first = [policy.move(0, a), policy.move(1, far), policy.move(2, a)]
    assert copied.count("meta") == 4  # omega, beta, lo, hi: once
    for _ in range(3):  # token after token, alternating devices
        again = [policy.move(0, a), policy.move(1, far), policy.move(2, a)]
        assert torch.equal(again[0], first[0]) and torch.equal(again[2], first[2])
    assert copied.count("meta") == 4
    omega, beta, lo, hi = policy.omega[0], policy.beta[0], policy.lo[0], policy.hi[0]
    moved = a + policy.strength * (omega * a + beta - a)
    assert torch.equal(first[0], torch.where((a >= lo) & (a <= hi), moved, a))
