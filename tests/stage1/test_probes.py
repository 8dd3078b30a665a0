"""Tests of slim.stage1.probes: losses, the batched trainer against the one-probe
reference, the hand-written gradient, the layer detector and persistence."""

import math
import os

import numpy as np
import pytest
import torch

from slim.config import LOSS_TYPES, ParameterError, ProbeConfig
from slim.stage1.detector import choose_layer, choose_tau, evaluate_layers, layer_metrics
from slim.stage1.losses import (
    cross_entropy_loss,
    hard_risk_loss,
    l2_loss,
    probe_loss,
    row_coef,
    smooth_risk_loss,
    theta_grad,
)
from slim.stage1.probes import RiskAwareProbes, fit_one_probe, init_weights, load_probes, save_probes

# -----------------------------------------------------------------------------
# losses on a 4-row, 2-probe example worked out by hand

Y4 = torch.tensor([1, 0, 1, 0])  # N1 = 2 undesirable rows, N0 = 2 desirable
P4 = torch.tensor([[0.9, 0.5], [0.2, 0.1], [0.4, 0.7], [0.6, 0.3]], dtype=torch.float64)  # (N, P)
W4 = torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=torch.float64)  # ||w||^2 = 5, 9


def test_smooth_risk_loss_by_hand():
    # probe 0: FPR = (0.2 + 0.6)/2 = 0.4, FNR = (0.1 + 0.6)/2 = 0.35
    # probe 1: FPR = (0.1 + 0.3)/2 = 0.2, FNR = (0.5 + 0.3)/2 = 0.4
    got = smooth_risk_loss(P4, Y4, bl=2.0)
    torch.testing.assert_close(got, torch.tensor([0.4 + 0.7, 0.2 + 0.8], dtype=torch.float64))
    got = smooth_risk_loss(P4, Y4, bl=2.0, beta=0.5, weight=W4)  # + 0.5 * (5, 9)
    torch.testing.assert_close(got, torch.tensor([1.1 + 2.5, 1.0 + 4.5], dtype=torch.float64))


def test_hard_risk_loss_by_hand():
    # probe 0 predicts [1, 0, 0, 1]: FP = row 3 -> FPR 1/2, FN = row 2 -> FNR 1/2
    # probe 1 predicts [0, 0, 1, 0] (0.5 is not > 0.5): FPR 0, FN = row 0 -> FNR 1/2
    torch.testing.assert_close(
        hard_risk_loss(P4, Y4, bl=2.0), torch.tensor([0.5 + 1.0, 0.0 + 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(hard_risk_loss(P4, Y4, bl=1.0), torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_ablation_losses_by_hand():
    ce0 = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.4)) / 4
    ce1 = -(math.log(0.5) + math.log(0.9) + math.log(0.7) + math.log(0.7)) / 4
    torch.testing.assert_close(cross_entropy_loss(P4, Y4), torch.tensor([ce0, ce1], dtype=torch.float64))
    l20 = (0.1**2 + 0.2**2 + 0.6**2 + 0.6**2) / 4
    l21 = (0.5**2 + 0.1**2 + 0.3**2 + 0.3**2) / 4
    torch.testing.assert_close(
        l2_loss(P4, Y4, beta=0.1, weight=W4), torch.tensor([l20 + 0.5, l21 + 0.9], dtype=torch.float64)
    )


# -----------------------------------------------------------------------------
# a small random problem: weak class-dependent shifts, so probes learn something


def make_problem(N=200, N_val=100, P=6, d=8, seed=0):
    rng = np.random.default_rng(seed)
    shift = 0.4 * rng.standard_normal((P, d))
    y = rng.integers(0, 2, N)
    y_val = rng.integers(0, 2, N_val)
    X = rng.standard_normal((N, P, d)) + y[:, None, None] * shift
    X_val = rng.standard_normal((N_val, P, d)) + y_val[:, None, None] * shift
    return X, y, X_val, y_val


@pytest.mark.parametrize("checkpoint", ["last", "best"])
@pytest.mark.parametrize(
    "loss_type,bl,beta,dtype",
    [
        ("risk", 1.5, 0.01, "float64"),
        ("cross_entropy", 1.0, 0.0, "float64"),
        ("l2", 0.8, 0.0, "float64"),
        ("risk", 1.0, 0.0, "float32"),  # the production dtype also agrees (about 1e-7 here)
    ],
)
def test_batched_equals_reference(loss_type, bl, beta, dtype, checkpoint):
    X, y, X_val, y_val = make_problem()
    P, d, epochs = X.shape[1], X.shape[2], 300
    probes = RiskAwareProbes(
        loss_type=loss_type, bl=bl, beta=beta, epochs=epochs, seed=3, dtype=dtype, block_size=4, checkpoint=checkpoint
    ).fit(X, y, X_val, y_val)
    w0, b0 = init_weights(P, d, seed=3)
    dtype = getattr(torch, dtype)
    for p in range(P):
        w, b, epoch, loss = fit_one_probe(
            X[:, p],
            y,
            X_val[:, p],
            y_val,
            w0[p].to(dtype),
            b0[p],
            loss_type=loss_type,
            bl=bl,
            beta=beta,
            epochs=epochs,
            dtype=dtype,
            checkpoint=checkpoint,
        )
        assert int(probes.epoch_[p]) == epoch
        assert float(probes.val_loss_[p]) == pytest.approx(loss, abs=1e-12)
        torch.testing.assert_close(probes.coef_[p], w, rtol=0, atol=1e-5)
        assert float(probes.intercept_[p]) == pytest.approx(b, abs=1e-5)
    # the best epoch is not simply the last one, so selection was exercised
    assert (probes.best_epoch_ < epochs).any()
    if checkpoint == "last":
        assert (probes.epoch_ == epochs).all()
    else:
        assert torch.equal(probes.epoch_, probes.best_epoch_)


def test_block_size_and_jobs_do_not_change_the_result():
    X, y, X_val, y_val = make_problem(P=7)
    kw = dict(epochs=60, dtype="float64")
    ref = RiskAwareProbes(block_size=7, n_jobs=1, **kw).fit(X, y, X_val, y_val)
    for block_size, n_jobs in [(1, 1), (3, 2), (2, 3)]:
        got = RiskAwareProbes(block_size=block_size, n_jobs=n_jobs, **kw).fit(X, y, X_val, y_val)
        torch.testing.assert_close(got.coef_, ref.coef_, rtol=0, atol=1e-12)
        assert torch.equal(got.best_epoch_, ref.best_epoch_)


def test_float16_layered_input_and_predict_proba():
    X, y, X_val, y_val = make_problem(P=6)
    L, H, d = 2, 3, X.shape[2]
    X4 = X.reshape(len(X), L, H, d).astype(np.float16)
    Xv4 = X_val.reshape(len(X_val), L, H, d).astype(np.float16)
    probes = RiskAwareProbes(epochs=50).fit(X4, y, Xv4, y_val)
    assert probes.coef_.shape == (6, d) and probes.intercept_.shape == (6,)
    assert probes.best_epoch_.shape == (6,) and probes.best_val_loss_.shape == (6,)
    proba = probes.predict_proba(Xv4)
    assert proba.shape == (len(X_val), L, H)
    # sigmoid(theta0 + theta . a), by numpy
    z = (
        np.einsum("npd,pd->np", Xv4.reshape(len(X_val), 6, d).astype(np.float64), probes.coef_.double().numpy())
        + probes.intercept_.double().numpy()
    )
    np.testing.assert_allclose(proba.reshape(len(X_val), 6).numpy(), 1 / (1 + np.exp(-z)), atol=1e-5)
    assert probes.predict_proba(Xv4.reshape(len(X_val), 6, d)).shape == (len(X_val), 6)
    # the recorded val loss is the hard loss of the kept parameters
    flat = torch.from_numpy(Xv4.reshape(len(X_val), 6, d).astype(np.float32))
    torch.testing.assert_close(hard_risk_loss(probes.predict_proba(flat), y_val), probes.val_loss_)


# -----------------------------------------------------------------------------
# the kept checkpoint: last epoch (published code) or best validation epoch (paper)


def make_early_peak_problem(N=120, N_val=80, P=3, d=4, seed=0):
    """The validation labels are the training ones flipped: the better a probe fits the training rows,
    the worse it does on validation, so the best validation epoch comes early."""
    rng = np.random.default_rng(seed)
    shift = 1.5 * rng.standard_normal((P, d))
    y, y_val = rng.integers(0, 2, N), rng.integers(0, 2, N_val)
    X = rng.standard_normal((N, P, d)) + y[:, None, None] * shift
    X_val = rng.standard_normal((N_val, P, d)) + (1 - y_val)[:, None, None] * shift
    return X, y, X_val, y_val


def train_without_checkpoints(x, y, w0, b0, epochs, lr=2e-3):
    """The risk loss (bl 1, beta 0) by nn.Linear + Adam for `epochs` steps: no validation at all."""
    lin = torch.nn.Linear(x.shape[1], 1).double()
    with torch.no_grad():
        lin.weight.copy_(w0.reshape(1, -1))
        lin.bias.fill_(float(b0))
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    for _ in range(epochs):
        loss = probe_loss("risk", torch.sigmoid(lin(x)), y, 1.0, 0.0, lin.weight).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lin.weight.detach()[0], float(lin.bias.detach()[0])


def test_last_and_best_checkpoints_differ_when_validation_peaks_early():
    X, y, X_val, y_val = make_early_peak_problem()
    P, d, epochs = X.shape[1], X.shape[2], 200
    kw = dict(epochs=epochs, seed=1, dtype="float64")
    last = RiskAwareProbes(checkpoint="last", **kw).fit(X, y, X_val, y_val)
    best = RiskAwareProbes(checkpoint="best", **kw).fit(X, y, X_val, y_val)
    assert RiskAwareProbes().checkpoint == "last"  # the published code's, by default

    # one training run, two checkpoints of it
    assert torch.equal(last.best_epoch_, best.best_epoch_) and (best.best_epoch_ <= epochs // 4).all()
    assert torch.equal(best.epoch_, best.best_epoch_) and (last.epoch_ == epochs).all()
    assert (best.val_loss_ < last.val_loss_).all()
    assert ((best.coef_ - last.coef_).abs().amax(1) > 1e-3).all()

    # "last" is training without any checkpointing
    w0, b0 = init_weights(P, d, seed=1)
    for p in range(P):
        w, b = train_without_checkpoints(X[:, p], y, w0[p].double(), b0[p], epochs)
        torch.testing.assert_close(last.coef_[p], w, rtol=0, atol=1e-10)
        assert float(last.intercept_[p]) == pytest.approx(b, abs=1e-10)


def test_checkpoint_in_config_tag_and_probe_file(tmp_path):
    from slim.stage1.fit import train_fold_probes

    assert ProbeConfig().checkpoint == "last"
    last, best = ProbeConfig(epochs=3), ProbeConfig(epochs=3, checkpoint="best")
    # the tag names the probe files, layer tables and maps: one checkpoint never reads the other's
    assert last.tag().endswith("_ckptlast") and best.tag().endswith("_ckptbest")
    assert best.with_bl(2.0).checkpoint == "best"
    with pytest.raises(ParameterError, match="checkpoint must be one of last, best"):
        ProbeConfig(checkpoint="middle")

    X, y, X_val, y_val = make_early_peak_problem(P=6)
    acts = np.concatenate([X, X_val]).reshape(-1, 2, 3, X.shape[2]).astype(np.float16)  # (N, L, H, d)
    labels = np.concatenate([y, y_val])
    train_rows, val_rows = np.arange(len(X)), np.arange(len(X), len(acts))
    path = tmp_path / "probes.safetensors"
    first = train_fold_probes(acts, labels, train_rows, val_rows, best, path, "f")
    assert load_probes(path)[3]["config"]["checkpoint"] == "best"
    # the same path with the other checkpoint: trained again, not read back
    again = train_fold_probes(acts, labels, train_rows, val_rows, last, path, "f")
    assert load_probes(path)[3]["config"]["checkpoint"] == "last"
    assert not np.array_equal(first.weight, again.weight)


# -----------------------------------------------------------------------------
# hand-written gradient against autograd


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_hand_gradient_matches_autograd(loss_type, beta):
    gen = torch.Generator().manual_seed(1)
    P, d, N, bl = 5, 7, 50, 1.7
    X = torch.randn(P, d, N, generator=gen, dtype=torch.float64)
    XT = torch.cat([X, torch.ones(P, 1, N, dtype=torch.float64)], 1)  # (P, d+1, N)
    y = (torch.rand(N, generator=gen) > 0.4).double()
    theta = torch.randn(P, d + 1, generator=gen, dtype=torch.float64)

    hand = theta_grad(loss_type, XT, theta, N, y, row_coef(loss_type, y, bl), beta)

    theta_ag = theta.clone().requires_grad_(True)
    p = torch.sigmoid(torch.bmm(theta_ag.unsqueeze(1), XT).squeeze(1)).T  # (N, P)
    probe_loss(loss_type, p, y, bl, beta, theta_ag[:, :-1]).sum().backward()
    torch.testing.assert_close(hand, theta_ag.grad, rtol=1e-10, atol=1e-12)


def test_init_weights_is_xavier_uniform():
    d = 64
    w, b = init_weights(270, d, seed=0)
    bound = math.sqrt(6 / (d + 1))
    assert w.shape == (270, d) and torch.all(b == 0)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    # nn.init.xavier_uniform_ draws from the same bound for a Linear(d, 1)
    lin = torch.nn.Linear(d, 1)
    torch.nn.init.xavier_uniform_(lin.weight)
    assert lin.weight.abs().max() <= bound
    assert torch.equal(init_weights(270, d, seed=0)[0], w)


# -----------------------------------------------------------------------------
# layer detector on a 6-row, 3-head example counted by hand

VOTES = np.array(
    [
        [1, 1, 0],  # y=1, 2 votes
        [1, 0, 0],  # y=0, 1 vote
        [0, 0, 0],  # y=0, 0 votes
        [1, 1, 1],  # y=1, 3 votes
        [0, 1, 0],  # y=1, 1 vote
        [1, 1, 0],
    ],  # y=0, 2 votes
    dtype=bool,
)
Y6 = np.array([1, 0, 0, 1, 1, 0])
# tau=0: fires always -> FPR 1, FNR 0;  tau=1: FP rows 1, 5 -> FPR 2/3, FNR 0;
# tau=2: FP row 5 -> FPR 1/3, FN row 4 -> FNR 1/3


def test_choose_tau_by_hand():
    assert choose_tau(VOTES, Y6, bl=1.0) == 1  # tau 1 and 2 tie at 2/3: the smaller wins
    assert choose_tau(VOTES, Y6, bl=2.0) == 1  # 2/3 against 1/3 + 2/3
    assert choose_tau(VOTES, Y6, bl=0.5) == 2  # 2/3 against 1/3 + 1/6


def test_layer_metrics_by_hand():
    pred = VOTES.sum(1) >= 2  # [1, 0, 0, 1, 0, 1]
    m = layer_metrics(pred, Y6)
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (2, 2, 1, 1)
    assert m["acc"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx(4 / 6)
    assert m["fpr"] == pytest.approx(1 / 3) and m["fnr"] == pytest.approx(1 / 3)
    # empty denominators give 0, not NaN
    m = layer_metrics(np.zeros(4, bool), np.zeros(4, int))
    assert (m["acc"], m["f1"], m["fpr"], m["fnr"]) == (1.0, 0.0, 0.0, 0.0)


def test_evaluate_and_choose_layer():
    # layer 0: the votes above; layer 1: head 0 votes exactly y (a perfect detector at tau 1)
    proba = np.full((6, 2, 3), 0.1)
    proba[:, 0][VOTES] = 0.9
    proba[:, 1, 0] = np.where(Y6 == 1, 0.8, 0.2)
    rows = evaluate_layers(None, proba, Y6, bl=0.5)
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["tau"] == 2 and rows[0]["val_loss"] == pytest.approx(1 / 3 + 1 / 6)
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"]) == (2, 1, 1)
    assert rows[1]["tau"] == 1 and rows[1]["val_loss"] == 0 and rows[1]["acc"] == 1
    for criterion in ("val_loss", "fnr", "fpr", "1-acc", "1-f1"):
        assert choose_layer(rows, criterion) == 1
    # activations and fitted probes give the same rows as their probabilities
    X, y, X_val, y_val = make_problem(P=6)
    probes = RiskAwareProbes(epochs=20).fit(X, y, X_val, y_val)
    X4 = X_val.reshape(len(X_val), 2, 3, -1)
    assert evaluate_layers(probes, X4, y_val) == evaluate_layers(None, probes.predict_proba(X4), y_val)


# -----------------------------------------------------------------------------
# persistence


def test_save_load_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weight, bias, tau = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, generator=gen), torch.tensor([0, 1, 1])
    path = str(tmp_path / "probes.safetensors")
    save_probes(path, weight, bias, tau, {"model": "smollm2", "bl": 1.0, "layer": 2})
    save_probes(path, weight, bias, tau, {"model": "smollm2", "bl": 1.0, "layer": 2})  # overwrite
    w, b, t, meta = load_probes(path)
    assert torch.equal(w, weight) and torch.equal(b, bias) and torch.equal(t, tau)
    assert meta == {"model": "smollm2", "bl": 1.0, "layer": 2}
    # no temporary file left behind; the record of size and sha256 beside it
    assert sorted(os.listdir(tmp_path)) == ["probes.safetensors", "probes.safetensors.sha256.json"]
    with pytest.raises(ValueError):
        save_probes(path, weight, bias[:2], tau)
    with pytest.raises(ValueError):
        save_probes(path, weight, bias, tau, {"bad": object()})


# -----------------------------------------------------------------------------
# bad inputs


def test_bad_parameters_raise():
    X, y, X_val, y_val = make_problem(N=20, N_val=10, P=2, d=3)
    for kw in [
        dict(bl=-1),
        dict(beta=-0.1),
        dict(epochs=0),
        dict(epochs=2.5),
        dict(lr=0),
        dict(loss_type="hinge"),
        dict(dtype="float16"),
        dict(block_size=0),
        dict(n_jobs=0),
        dict(checkpoint="middle"),
        dict(device="gpu"),
        dict(device="cuda:99"),  # no machine has it
    ]:
        with pytest.raises(ValueError):
            RiskAwareProbes(**kw).fit(X, y, X_val, y_val)


def test_bad_data_raise():
    X, y, X_val, y_val = make_problem(N=20, N_val=10, P=2, d=3)
    fit = RiskAwareProbes(epochs=2).fit
    bad_y = y.copy()
    bad_y[0] = 2
    nan_X = X.copy()
    nan_X[3, 1, 2] = np.nan
    cases = [
        (X, bad_y, X_val, y_val),  # labels not binary
        (X, np.zeros(20, int), X_val, y_val),  # no undesirable training row
        (X, y, X_val, np.ones(10, int)),  # no desirable validation row
        (X, y[:-1], X_val, y_val),  # label count mismatch
        (X, y, X_val[:, :, :2], y_val),  # head size mismatch
        (X, y, X_val[:, :1], y_val),  # probe count mismatch
        (X[:, 0], y, X_val[:, 0], y_val),  # 2-D activations
        (nan_X, y, X_val, y_val),  # NaN activation
    ]
    for args in cases:
        with pytest.raises(ValueError):
            fit(*args)
    with pytest.raises(ValueError):
        RiskAwareProbes().predict_proba(X)  # not fitted
    with pytest.raises(ValueError):
        choose_tau(VOTES, np.ones(6))  # one label only
    with pytest.raises(ValueError):
        choose_tau(VOTES, Y6, bl=-1)
    with pytest.raises(ValueError):
        choose_layer([{"layer": 0, "val_loss": 0.1}], criterion="auc")
    with pytest.raises(ValueError):
        hard_risk_loss(P4[:, 0], Y4)  # p must be (N, P)


# -----------------------------------------------------------------------------
# on a GPU: block size from free memory, no host sync per epoch, float32 without TF32


def test_gpu_block_follows_free_memory(monkeypatch):
    P, d, N, N_val, E = 5120, 128, 4700, 1200, 1000
    n = N + N_val

    def buffer_bytes(B, checkpoint):  # what one block allocates, counted from _train_block's buffers
        floats = B * (d + 1) * n + B * (n + 2 * N + N_val) + (E + 1) * B * 2 + 5 * B * (d + 1)
        floats += (E + 1) * B * (d + 1) if checkpoint == "best" else 0
        return 4 * floats + 2 * B * d * n  # float32 buffers, float16 rows as they arrive

    free = 12 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    for checkpoint in ("last", "best"):
        B = RiskAwareProbes(device="cuda:0", epochs=E, checkpoint=checkpoint)._block_size(P, d, n, 2)
        assert 0 < B < P and buffer_bytes(B, checkpoint) <= 0.6 * free < buffer_bytes(B + 64, checkpoint)
    last = RiskAwareProbes(device="cuda:0", epochs=E)._block_size(P, d, n, 2)
    assert RiskAwareProbes(device="cuda:0", epochs=E, checkpoint="best")._block_size(P, d, n, 2) < last
    free = 200 << 30
    assert RiskAwareProbes(device="cuda:0", epochs=E)._block_size(P, d, n, 2) == P  # all at once when they fit
    assert RiskAwareProbes(device="cuda:0", block_size=7)._block_size(P, d, n, 2) == 7


def test_host_syncs_do_not_grow_with_epochs(monkeypatch):
    """Every way a tensor's value reaches Python, counted: on a GPU each is a sync, so none may run per epoch."""
    X, y, X_val, y_val = make_problem(N=60, N_val=30, P=5, d=4)
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: calls.append(_n) or _real(self, *a, **k)
        )

    counts = {}
    for checkpoint in ("last", "best"):
        for epochs in (3, 40):
            calls.clear()
            RiskAwareProbes(epochs=epochs, checkpoint=checkpoint, block_size=5, n_jobs=1).fit(X, y, X_val, y_val)
            counts[checkpoint, epochs] = sorted(calls)
        assert counts[checkpoint, 3] == counts[checkpoint, 40] and len(counts[checkpoint, 3]) < 30


def test_tf32_is_off_while_probes_train_on_cuda():
    from slim.stage1.probes import _exact_float32_matmul

    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with _exact_float32_matmul(torch.device("cuda:0")):
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
        with _exact_float32_matmul(torch.device("cpu")):
            assert torch.backends.cuda.matmul.allow_tf32 is True  # the CPU has no TF32 to turn off
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag
