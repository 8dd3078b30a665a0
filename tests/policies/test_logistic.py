"""Tests of slim.policies.logistic (all heads' L2 logistic regressions at once) and fit_iti's two solvers.

The batched Newton solver minimises scikit-learn's LogisticRegression objective; it is checked against
scikit-learn solving the same problem to a tight tolerance (its newton-cholesky solver), against the
default lbfgs fit ITI has always used (which stops at tol 1e-4), and inside fit_iti on a realistic case.
"""

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import slim.policies.fit as fit
from slim.policies.fit import _iti_probes_sklearn, _iti_probes_torch, fit_iti
from slim.policies.logistic import block_heads, fit_logistic, torch_device


def heads_problem(P=64, d=64, N=300, scale=0.1, seed=0):
    """Rows (N, P, d) float32 of P heads, labels (N,): head p's rows shifted by scale * a random vector when y=1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, N)
    X = rng.standard_normal((N, P, d)) * rng.uniform(0.5, 2.0, d)  # unequal feature scales
    X += y[:, None, None] * scale * rng.standard_normal((P, d))
    return X.astype(np.float32), y


def objective(x, y, w, b, C=1.0):
    """scikit-learn's lbfgs objective: mean log-loss + ||w||^2 / (2 C N), in float64 by numpy."""
    x = x.astype(np.float64)
    z = x @ w + b
    return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * (w @ w) / (C * len(y))


def sklearn_fits(X, y, **kw):
    """(coef (P, d), intercept (P,)) of one scikit-learn LogisticRegression per head, on float64 rows
    (lbfgs casts to float64 itself; newton-cholesky would keep float32)."""
    coefs, intercepts = [], []
    for h in range(X.shape[1]):
        clf = LogisticRegression(**kw).fit(X[:, h].astype(np.float64), y)
        coefs.append(clf.coef_[0])
        intercepts.append(clf.intercept_[0])
    return np.array(coefs), np.array(intercepts)


@pytest.mark.parametrize("separable", [False, True])
def test_same_optimum_as_sklearn(separable):
    X, y = heads_problem(scale=3.0 if separable else 0.1)
    coef, intercept, n_iter = fit_logistic(X, y)
    assert coef.dtype == torch.float64 and coef.shape == (64, 64) and intercept.shape == (64,)
    assert (n_iter >= 2).all() and (n_iter < 30).all()  # Newton: tens of steps, not lbfgs's hundreds

    # the same problem solved tightly by scikit-learn's own Newton solver: the optimum is unique
    tight = sklearn_fits(X, y, solver="newton-cholesky", tol=1e-10, max_iter=1000)
    np.testing.assert_allclose(coef.numpy(), tight[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(intercept.numpy(), tight[1], rtol=0, atol=1e-6)

    # against ITI's fit (lbfgs, tol 1e-4): as close as lbfgs's stopping allows, and never a worse objective
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the separable heads can stop lbfgs on its iteration limit
        default = sklearn_fits(X, y, max_iter=1000)
    # lbfgs's gradient 1e-4 against a curvature of 1/(C N) leaves coefficient errors of a few 1e-2
    assert np.abs(coef.numpy() - default[0]).max() < 0.1 * np.abs(default[0]).max()
    for h in range(X.shape[1]):
        ours = objective(X[:, h], y, coef[h].numpy(), float(intercept[h]))
        assert ours <= objective(X[:, h], y, default[0][h], default[1][h]) + 1e-12
    if separable:  # every head separates its training rows: the penalty alone keeps the coefficients finite
        z = np.einsum("nhd,hd->nh", X.astype(np.float64), coef.numpy()) + intercept.numpy()
        assert ((z > 0) == (y[:, None] == 1)).all()


def test_blocks_give_the_same_fit():
    X, y = heads_problem(P=10, d=8, N=120)
    whole = fit_logistic(X, y)
    for got, ref in zip(fit_logistic(X, y, block_size=3), whole):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # float16 rows, as cached on disk, are the same numbers as their float32 copy
    half = X.astype(np.float16)
    for got, ref in zip(fit_logistic(half, y), fit_logistic(half.astype(np.float32), y)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_block_heads_on_a_gpu_follows_free_memory(monkeypatch):
    N, d = 4700, 128
    per_head = 8 * 2 * N * (d + 1)  # the float64 rows twice (XA and the weighted copy) at least
    assert block_heads(64, N, d, torch.device("cpu")) == 64
    assert 0 < block_heads(5120, N, d, torch.device("cpu")) * per_head <= 1 << 30  # a GiB at a time on the CPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 << 30, 80 << 30))
    B = block_heads(5120, N, d, torch.device("cuda:0"))
    assert 0 < B < 5120 and B * per_head <= 0.6 * (64 << 30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
    assert block_heads(5120, N, d, torch.device("cuda:0")) == 1  # never zero


def test_torch_device_names():
    assert torch_device(None) == torch.device("cpu")
    assert torch_device("0") == torch.device("cuda:0") and torch_device(1) == torch.device("cuda:1")
    assert torch_device("cuda:2") == torch.device("cuda:2")
    with pytest.raises(ValueError, match="device must be"):
        torch_device("gpu please")


def test_bad_input():
    X, y = heads_problem(P=3, d=4, N=40)
    with pytest.raises(ValueError, match="one class"):
        fit_logistic(X, np.ones(40, int))
    with pytest.raises(ValueError, match=r"\(40,\) of 0/1"):
        fit_logistic(X, y[:-1])
    with pytest.raises(ValueError, match=r"\(N, P, d\)"):
        fit_logistic(X[:, 0], y)
    bad = X.copy()
    bad[5, 2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        fit_logistic(bad, y)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        fit_logistic(X, y, max_iter=1)


# -----------------------------------------------------------------------------
# fit_iti's two solvers


def iti_problem(N=1500, n_val=300, L=4, H=16, d=64, seed=0):
    """Activations (N, L, H, d) float16 where 8 heads carry graded, well-spaced signal and the rest little."""
    rng = np.random.default_rng(seed)
    truthful = rng.integers(0, 2, N)
    strength = rng.uniform(0, 0.05, (L, H))
    strength.flat[rng.permutation(L * H)[:8]] = np.linspace(0.15, 0.6, 8)
    direction = rng.standard_normal((L, H, d))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    acts = rng.standard_normal((N, L, H, d)) * rng.uniform(0.5, 2.0, d)
    acts += truthful[:, None, None, None] * 3 * strength[..., None] * direction
    return acts.astype(np.float16), truthful, np.arange(N - n_val), np.arange(N - n_val, N)


def test_iti_heads_and_accuracies_agree_between_solvers():
    acts, truthful, train, val = iti_problem()
    L, H, d = acts.shape[1:]
    acc_sk, coef_sk = _iti_probes_sklearn(acts, truthful, train, val, 0, None)
    acc_t, coef_t = _iti_probes_torch(acts, truthful, train, val, 0, torch.device("cpu"))

    # every head's val accuracy equals scikit-learn's at its optimum (the same objective, solved tightly)
    for layer in range(L):
        for head in range(H):
            clf = LogisticRegression(solver="newton-cholesky", tol=1e-10, max_iter=1000)
            clf.fit(acts[train, layer, head].astype(np.float64), truthful[train])
            assert acc_t[layer, head] == clf.score(acts[val, layer, head].astype(np.float64), truthful[val])
    # lbfgs's early stop moves a few val rows of some heads, never more than 2
    assert np.abs(acc_t - acc_sk).max() <= 2 / len(val) + 1e-12
    np.testing.assert_allclose(coef_t, coef_sk, rtol=0, atol=0.01)

    # the heads ITI picks, their directions and sigmas: the same with either solver
    K = 8
    with_sk = fit_iti(acts, truthful, train, val, K, 1.0, direction="probe")
    with_t = fit_iti(acts, truthful, train, val, K, 1.0, direction="probe", solver="torch")
    assert torch.equal(with_t.heads, with_sk.heads)
    np.testing.assert_allclose(with_t.meta["val_accuracy"], with_sk.meta["val_accuracy"], rtol=0, atol=2 / len(val))
    torch.testing.assert_close(with_t.directions, with_sk.directions, rtol=0, atol=5e-3)
    assert with_sk.meta["solver"] == "sklearn" and with_t.meta["solver"] == "torch"


def test_iti_solver_is_sklearn_on_any_device_unless_torch_is_asked(monkeypatch):
    """The published scikit-learn fits by default, on a GPU too (the same heads as on a CPU); torch when asked,
    on the run's device."""
    acts, truthful, train, val = iti_problem(N=200, n_val=50, L=2, H=3, d=4)
    ran = []

    def fake_torch(acts, y, train_rows, val_rows, seed, dev):  # stands in for the GPU fit
        ran.append(dev)
        return _iti_probes_sklearn(acts, y, train_rows, val_rows, seed, dev)

    monkeypatch.setattr(fit, "_iti_probes_torch", fake_torch)
    assert fit_iti(acts, truthful, train, val, 2, 1.0).meta["solver"] == "sklearn" and ran == []
    assert fit_iti(acts, truthful, train, val, 2, 1.0, device="cpu").meta["solver"] == "sklearn"
    assert fit_iti(acts, truthful, train, val, 2, 1.0, device="cuda:1").meta["solver"] == "sklearn" and ran == []
    assert fit_iti(acts, truthful, train, val, 2, 1.0, device="cuda:1", solver="torch").meta["solver"] == "torch"
    assert ran == [torch.device("cuda:1")]
    with pytest.raises(ValueError, match="solver .--iti_solver. must be 'sklearn' or 'torch'"):
        fit_iti(acts, truthful, train, val, 2, 1.0, solver="liblinear")
