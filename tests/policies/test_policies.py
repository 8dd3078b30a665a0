"""SLIM, ITI and MiMiC-style policies on a tiny random Llama."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from slim.answering.decoding import generate_greedy
from slim.config import SlimConfig
from slim.models.heads import HeadTrace, attention_output_projections
from slim.policies.base import Policy, model_fingerprint
from slim.policies.fit import fit_iti, fit_mimic, fit_slim
from slim.policies.iti import ITIPolicy
from slim.policies.mimic import MimicPolicy
from slim.policies.slim import SlimPolicy

H, D, LAYER = 4, 8, 1
IDS = torch.tensor([[5, 9, 12, 7, 30, 3], [4, 8, 15, 16, 23, 42]])


def random_slim(model, tau, kappa=3.0, psi="identity", seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(H, D, generator=g)
    bias = torch.randn(H, generator=g) * 0.1
    A = torch.eye(D) + 0.3 * torch.randn(H, D, D, generator=g)
    b = torch.randn(H, D, generator=g)
    return SlimPolicy(
        weight, bias, A, b, layer=LAYER, tau=tau, kappa=kappa, psi=psi, fingerprint=model_fingerprint(model)
    )


def used_inputs(model, policy, positions=None, ids=IDS):
    """The (batch, seq, H, d) input the projection really used, and the pre-edit activations.

    `positions`: the (batch, seq) mask the policy is told to edit (default: its own, the last position)."""
    seen = {}
    proj = attention_output_projections(model)[LAYER]
    with HeadTrace(model, layers=[LAYER], record="all") as before:
        model(ids)
    with policy.attach(model) as trace:
        trace.positions = positions
        handle = proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
        model(ids)
        handle.remove()
    return seen["x"].view(*ids.shape, H, D), before.activations[LAYER]


def test_slim_moves_exactly_the_voting_heads_by_the_formula():
    model = tiny_model("llama")
    policy = random_slim(model, tau=1, kappa=2.5)
    used, before = used_inputs(model, policy)
    a = before[:, -1]  # (batch, H, d)
    p = torch.tensor(
        [[torch.sigmoid(policy.bias[h] + a[i, h] @ policy.weight[h]) for h in range(H)] for i in range(a.shape[0])]
    )
    votes = p > 0.5
    assert votes.any() and not votes.all(), "the example should have voting and silent heads"
    for i in range(a.shape[0]):
        fires = votes[i].sum() >= 1
        for h in range(H):
            expected = a[i, h]
            if fires and votes[i, h]:
                target = policy.A[h] @ a[i, h] + policy.b[h]
                expected = a[i, h] + 2.5 * p[i, h] * (target - a[i, h])
            torch.testing.assert_close(used[i, -1, h], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(used[:, :-1], before[:, :-1])  # only the last position is edited


def test_slim_below_tau_changes_nothing():
    model = tiny_model("llama")
    policy = random_slim(model, tau=H)  # needs every head to vote
    used, before = used_inputs(model, policy)
    p = torch.sigmoid(torch.einsum("bhd,hd->bh", before[:, -1], policy.weight) + policy.bias)
    assert ((p > 0.5).sum(-1) < H).all()
    assert torch.equal(used, before)


def test_softmax_psi_weights_sum_to_one_over_voting_heads():
    model = tiny_model("llama")
    policy = random_slim(model, tau=1, kappa=2.0, psi="softmax")
    a = torch.randn(5, H, D)
    new, votes, fired = policy.step(a)
    p = torch.sigmoid(torch.einsum("bhd,hd->bh", a, policy.weight) + policy.bias)
    for i in range(5):
        if not fired[i]:
            assert torch.equal(new[i], a[i])
            continue
        w = torch.where(votes[i], torch.exp(2.0 * p[i]), torch.zeros(H))
        w = w / w.sum()
        target = torch.einsum("hij,hj->hi", policy.A, a[i]) + policy.b
        torch.testing.assert_close(new[i], a[i] + w[:, None] * (target - a[i]), atol=1e-5, rtol=1e-5)


def test_each_forward_call_edits_only_its_last_position(tokenizer):
    """Under the KV cache, every generated token's step is edited at its own (single) position."""
    model = tiny_model("llama")
    policy = random_slim(model, tau=0, kappa=1.0)
    shapes = []
    original = policy.edit
    policy.edit = lambda layer, acts: (shapes.append(tuple(acts.shape[:2])), original(layer, acts))[1]
    generate_greedy(model, tokenizer, ["Q: who was it ?", "yes"], max_new_tokens=3, edit=policy)
    assert shapes[0][1] > 1 and shapes[1:] == [(2, 1), (2, 1)]


def test_zero_strength_policies_generate_what_the_model_generates(tokenizer):
    model = tiny_model("llama")
    prompts = ["Q: What is the capital of France ?", "Q: who was it ? A:"]
    plain = generate_greedy(model, tokenizer, prompts, max_new_tokens=10)
    slim0 = random_slim(model, tau=0, kappa=0.0)
    iti0 = ITIPolicy(
        [[0, 1], [2, 3]], torch.randn(2, D), torch.ones(2), alpha=0.0, fingerprint=model_fingerprint(model)
    )
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=10, edit=slim0) == plain
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=10, edit=iti0) == plain
    strong = random_slim(model, tau=0, kappa=50.0)
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=10, edit=strong) != plain


def test_iti_adds_alpha_sigma_direction():
    model = tiny_model("llama")
    direction = torch.nn.functional.normalize(torch.randn(1, D), dim=-1)
    policy = ITIPolicy([[LAYER, 2]], direction, torch.tensor([0.7]), alpha=3.0, fingerprint=model_fingerprint(model))
    used, before = used_inputs(model, policy)
    expected = before.clone()
    expected[:, -1, 2] += 3.0 * 0.7 * direction[0]
    torch.testing.assert_close(used, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["slim", "iti", "mimic"])
def test_saved_and_reloaded_policy_generates_identically(kind, tmp_path, tokenizer):
    model = tiny_model("llama")
    fp = model_fingerprint(model)
    if kind == "slim":
        policy = random_slim(model, tau=1, kappa=4.0)
    elif kind == "iti":
        policy = ITIPolicy([[0, 1], [LAYER, 3]], torch.randn(2, D), torch.rand(2) + 0.5, alpha=5.0, fingerprint=fp)
    else:
        policy = MimicPolicy(torch.eye(D).repeat(H, 1, 1) * 1.5, torch.randn(H, D), layer=LAYER, fingerprint=fp)
    prompts = ["Q: What is the capital of France ?", "Q: who"]
    before = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, edit=policy)
    loaded = Policy.load(policy.save(tmp_path / kind))
    assert type(loaded) is type(policy) and loaded.params() == policy.params()
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=8, edit=loaded) == before


def test_bad_inputs_are_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="kappa"):
        random_slim(model, tau=1, kappa=-1.0)
    with pytest.raises(ValueError, match="psi"):
        random_slim(model, tau=1, psi="max")
    fp = model_fingerprint(model)
    with pytest.raises(ValueError, match="out of range"):
        SlimPolicy(
            torch.zeros(H, D),
            torch.zeros(H),
            torch.zeros(H, D, D),
            torch.zeros(H, D),
            layer=9,
            tau=1,
            kappa=1.0,
            fingerprint=fp,
        )
    with pytest.raises(ValueError, match="out of range"):
        ITIPolicy([[0, 7]], torch.zeros(1, D), torch.ones(1), alpha=1.0, fingerprint=fp)
    folder = random_slim(model, tau=1).save(tmp_path / "p")
    other = tiny_model("gpt2")
    with pytest.raises(ValueError, match="fitted on a model"):
        Policy.load(folder).attach(other)
    with pytest.raises(ValueError, match="no saved policy"):
        Policy.load(tmp_path)


def test_fitting_from_activations():
    rng = np.random.default_rng(0)
    N, L = 400, 3
    truthful = rng.integers(0, 2, N)
    acts = rng.standard_normal((N, L, H, D)).astype(np.float32)
    acts[:, 1, 2] += 2.0 * truthful[:, None]  # one informative head
    train, val = np.arange(300), np.arange(300, N)
    iti = fit_iti(acts, truthful, train, val, num_heads=2, alpha=1.0)
    assert [1, 2] == iti.heads[0].tolist()
    assert iti.directions[0] @ torch.ones(D) > 0  # points towards the truthful class mean
    mimic = fit_mimic(acts[:, 1], 1 - truthful, layer=1)
    mapped = torch.einsum("ij,nj->ni", mimic.A[2], torch.as_tensor(acts[truthful == 0, 1, 2])) + mimic.b[2]
    np.testing.assert_allclose(mapped.mean(0).numpy(), acts[truthful == 1, 1, 2].mean(0), atol=1e-4)
    weight = np.zeros((H, D))
    weight[2] = -1.0
    slim = fit_slim(acts[:, 1], weight, np.zeros(H), layer=1, tau=1, cfg=SlimConfig(gamma=0.1, kappa=2.0))
    infos = slim.meta["maps"]
    assert infos[2]["status"] == "moved" and np.isfinite(slim.A.numpy()).all()


# Row 0 edited from position 2 on (an answer's first token), row 1 from position 0 (CE/KL).
MASK = torch.tensor([[False, False, True, True, True, True], [True] * 6])


def policy_of(kind, model):
    """Policies that edit layer LAYER only, so its pre-edit activations are the unedited model's."""
    fp = model_fingerprint(model)
    if kind == "slim":
        return random_slim(model, tau=2, kappa=2.5, seed=1)  # fires at half the marked positions
    if kind == "iti":
        return ITIPolicy([[LAYER, 0], [LAYER, 2]], torch.randn(2, D), torch.rand(2) + 0.5, alpha=3.0, fingerprint=fp)
    A = torch.eye(D) + 0.3 * torch.randn(H, D, D, generator=torch.Generator().manual_seed(4))
    return MimicPolicy(A, torch.randn(H, D), layer=LAYER, strength=0.7, fingerprint=fp)


@pytest.mark.parametrize("kind", ["slim", "iti", "mimic"])
def test_each_marked_position_moves_as_the_last_position_of_its_own_prefix_would(kind):
    """One forward pass editing a mask of positions = the policy run on each prefix, one at a time."""
    model = tiny_model("llama")
    policy = policy_of(kind, model)
    used, before = used_inputs(model, policy, MASK)
    for i in range(IDS.shape[0]):
        for t in range(IDS.shape[1]):
            if MASK[i, t]:  # the prefix ending at t, edited at its last position by the policy's default
                alone, _ = used_inputs(model, policy, ids=IDS[i : i + 1, : t + 1])
                torch.testing.assert_close(used[i, t], alone[0, -1], atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(used[i, t], before[i, t])
    assert not torch.allclose(used[MASK], before[MASK])
    if kind == "slim":  # the detector decided per position: it fired at some marked positions, not at others
        fired = policy.step(before[MASK])[2]
        assert fired.any() and not fired.all()


def test_edit_positions_must_match_the_forward_call():
    model = tiny_model("llama")
    policy = random_slim(model, tau=1)
    for bad in (MASK[:, :5], MASK.float()):
        with pytest.raises(
            ValueError, match=r"edit positions must be a bool mask of the forward call's \(batch, seq\)"
        ):
            used_inputs(model, policy, bad)


def test_slim_counts_the_positions_at_which_its_layer_fires():
    rng = np.random.default_rng(0)
    H, d = 4, 6
    weight, bias = rng.standard_normal((H, d)), rng.standard_normal(H)
    A, b = np.tile(np.eye(d), (H, 1, 1)), np.zeros((H, d))
    policy = SlimPolicy(weight, bias, A, b, layer=0, tau=2, kappa=1.0)
    assert policy.firing_rate() is None  # nothing edited yet
    batches = [torch.randn(5, H, d), torch.randn(3, H, d)]
    for a in batches:
        policy.move(0, a)
    votes = [(torch.sigmoid(torch.einsum("bhd,hd->bh", a, policy.weight) + policy.bias) > 0.5).sum(-1) for a in batches]
    fired = sum(int((v >= 2).sum()) for v in votes)
    assert 0 < fired < 8 and policy.firing_rate() == pytest.approx(fired / 8)
    policy.reset_counts()
    assert policy.firing_rate() is None


@pytest.fixture
def host_copies(monkeypatch):
    """Shapes of the tensors copied from host memory to another device (Tensor.to, counted) while the test runs."""
    copied, original = [], torch.Tensor.to

    def to(self, *args, **kw):
        out = original(self, *args, **kw)
        if self.device.type == "cpu" and out.device.type != "cpu":
            copied.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    return copied


@pytest.mark.parametrize("kind", ["slim", "iti", "mimic"])
def test_per_token_edits_copy_nothing_from_host_memory_after_the_first(kind, host_copies):
    """The model's layer on another device (meta here, a GPU in use): its tensors are copied there on the first
    generated token only, not at every one."""
    policy = policy_of(kind, tiny_model("llama"))
    a = torch.empty(5, H, D, device="meta")  # (n, H, d) on the layer's device
    policy.move(LAYER, a)
    first = len(host_copies)
    assert first > 0
    for _ in range(3):
        assert policy.move(LAYER, a).shape == (5, H, D)
    assert len(host_copies) == first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cached_tensors_move_as_the_formulas(dtype):
    """ITI and MiMiC, twice each (the second from the cached tensors), byte-equal to their formulas in the
    model's dtype."""
    model = tiny_model("llama")
    a = torch.randn(5, H, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    iti, mimic = policy_of("iti", model), policy_of("mimic", model)
    expected = a.clone()
    for (_, h), sigma, direction in zip(iti.heads.tolist(), iti.sigmas, iti.directions):
        expected[:, h] += (iti.alpha * sigma * direction).to(dtype)
    a32 = a.float()
    mapped = torch.einsum("hij,bhj->bhi", mimic.A, a32) + mimic.b
    expected_mimic = (a32 + mimic.strength * (mapped - a32)).to(dtype)
    for _ in range(2):
        assert torch.equal(iti.move(LAYER, a), expected)
        assert torch.equal(mimic.move(LAYER, a), expected_mimic)
