"""Tests of slim.policies.gaussian_ot: the exact head-wise solution against the SDP of paper eq. 4,
the OT map by sampling, fallbacks, input checks and safetensors I/O."""

import math
import os
import warnings

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm

from slim.config import SlimConfig
from slim.policies.gaussian_ot import (
    MAX_CONDITION,
    head_map_from_moments,
    ot_map,
    regularize_covariance,
    solve_head_sdp,
)
from slim.policies.head_maps import HeadMap, fit_head_map, fit_layer_maps, load_layer_maps, save_layer_maps

# -----------------------------------------------------------------------------
# helpers


def sqrtm_psd(x):
    w, V = np.linalg.eigh(x)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def make_instance(d, gamma, regime, seed):
    """Random (mu_hat, sigma_hat, theta, theta0) whose constraint binds.

    regime picks the probe logit m = theta0 + theta . mu_hat:
      "neg_m"      m < 0 but the spread violates the constraint: interior optimum, mean may not move
      "pos_m"      m > 0, interior optimum (0 < ||S* u|| < ||R u||)
      "degenerate" m large: optimum at ||S* u|| = 0, as observed on real activations
    """
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, d))
    sigma = W @ W.T / d + 0.1 * np.eye(d)
    mu = rng.standard_normal(d)
    theta = rng.standard_normal(d)
    q = norm.ppf(1 - gamma)
    R = sqrtm_psd(sigma)
    n = np.linalg.norm(theta)
    u = theta / n
    Ru = R @ u
    r_a = u @ Ru
    v = Ru - r_a * u
    kappa0 = math.sqrt(r_a**2 + 4 * v @ v)  # -f'(0+)/2 without the mean term
    m = {"neg_m": -0.5 * q * n * np.linalg.norm(Ru), "pos_m": 0.5 * n * kappa0 / q, "degenerate": 2.0 * n * kappa0 / q}[
        regime
    ]
    return mu, sigma, theta, m - theta @ mu


def nested_reference(mu_hat, sigma, theta, theta0, gamma):
    """closed-form-ot.md taken literally: inner root for lam, bounded scalar search over s."""
    q = norm.ppf(1 - gamma)
    R = sqrtm_psd(sigma)
    n = np.linalg.norm(theta)
    u = theta / n
    m = theta0 + theta @ mu_hat
    Ru = R @ u
    r_a = u @ Ru
    rb2 = Ru @ Ru - r_a**2

    def lam_of(s):
        if s * s >= Ru @ Ru:
            return 0.0

        def h(lam):
            return r_a**2 / (1 + lam) ** 2 + 4 * rb2 / (2 + lam) ** 2 - s * s

        hi = 1.0
        while h(hi) > 0:
            hi *= 2
        return brentq(h, 0.0, hi, xtol=1e-14)

    def f(s):
        lam = lam_of(s)
        c = max(0.0, m + q * n * s)
        return c**2 / n**2 + (r_a * lam / (1 + lam)) ** 2 + 2 * rb2 * (lam / (2 + lam)) ** 2

    res = minimize_scalar(f, bounds=(1e-12, np.linalg.norm(Ru)), method="bounded", options=dict(xatol=1e-12))
    return min(res.fun, f(1e-12))


def cvxpy_sdp(mu_hat, sigma, theta, theta0, gamma):
    """Paper eq. 4 as written: the (d+1) x (d+1) LMI [[t I, S theta], [theta^T S, t]] >> 0."""
    cp = pytest.importorskip("cvxpy")
    solver = "CLARABEL" if "CLARABEL" in cp.installed_solvers() else "SCS"
    d = len(mu_hat)
    q = norm.ppf(1 - gamma)
    R = sqrtm_psd(sigma)
    mu = cp.Variable(d)
    S = cp.Variable((d, d), PSD=True)
    t = cp.Variable(nonneg=True)
    St = cp.reshape(S @ theta, (d, 1), order="F")
    lmi = cp.bmat([[t * np.eye(d), St], [St.T, cp.reshape(t, (1, 1), order="F")]])
    prob = cp.Problem(
        cp.Minimize(cp.sum_squares(mu - mu_hat) + cp.sum_squares(S - R)), [theta0 + theta @ mu + q * t <= 0, lmi >> 0]
    )
    prob.solve(solver=solver)
    assert prob.status == "optimal", prob.status
    return prob.value, mu.value, S.value


def objective(mu_hat, sigma, mu, S):
    return np.sum((mu - mu_hat) ** 2) + np.sum((S - sqrtm_psd(sigma)) ** 2)


def constraint(theta, theta0, gamma, mu, S):
    return theta0 + theta @ mu + norm.ppf(1 - gamma) * np.linalg.norm(S @ theta)


# -----------------------------------------------------------------------------
# the exact solution against the SDP solver


@pytest.mark.parametrize("regime", ["neg_m", "pos_m", "degenerate"])
@pytest.mark.parametrize("gamma", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("d", [4, 16, 32])
def test_matches_sdp_solver(d, gamma, regime):
    mu_hat, sigma, theta, theta0 = make_instance(d, gamma, regime, seed=100 * d + int(100 * gamma))
    mu_star, S_star, info = solve_head_sdp(mu_hat, sigma, theta, theta0, gamma, return_info=True)
    assert info["status"] == "moved"
    assert constraint(theta, theta0, gamma, mu_hat, sqrtm_psd(sigma)) > 0  # the constraint binds

    value, mu_ref, S_ref = cvxpy_sdp(mu_hat, sigma, theta, theta0, gamma)
    obj = objective(mu_hat, sigma, mu_star, S_star)
    assert obj == pytest.approx(info["objective"], rel=1e-12)
    assert obj == pytest.approx(value, rel=1e-6)
    assert obj <= value * (1 + 1e-9)  # the SDP solver cannot do better than the exact optimum
    np.testing.assert_allclose(mu_star, mu_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(S_star, S_ref, rtol=1e-4, atol=1e-4)

    # feasible and active (relative to the size of the terms)
    scale = abs(theta0) + np.abs(theta) @ np.abs(mu_star) + 1.0
    assert abs(constraint(theta, theta0, gamma, mu_star, S_star)) <= 1e-12 * scale
    # S* symmetric PSD
    np.testing.assert_array_equal(S_star, S_star.T)
    assert np.linalg.eigvalsh(S_star)[0] >= -1e-12 * np.abs(S_star).max()
    # the degenerate regime is on the boundary s = ||S* u|| = 0, the others inside
    s = np.linalg.norm(S_star @ theta) / np.linalg.norm(theta)
    if regime == "degenerate":
        assert info["t"] == 0.0 and s <= 1e-12
    else:
        assert 0.0 < info["t"] < 1.0 and s > 1e-3


@pytest.mark.parametrize("regime", ["neg_m", "pos_m", "degenerate"])
def test_matches_literal_nested_search(regime):
    # independent of cvxpy: the doc's nested (inner lam root, outer bounded search) formulation
    for seed in range(5):
        mu_hat, sigma, theta, theta0 = make_instance(12, 0.1, regime, seed)
        _, _, info = solve_head_sdp(mu_hat, sigma, theta, theta0, 0.1, return_info=True)
        assert info["objective"] == pytest.approx(nested_reference(mu_hat, sigma, theta, theta0, 0.1), rel=1e-8)


def test_feasible_is_identity():
    mu_hat, sigma, theta, theta0 = make_instance(6, 0.1, "pos_m", seed=1)
    theta0 = -theta @ mu_hat - 10 * np.linalg.norm(sqrtm_psd(sigma) @ theta)  # deep on the desirable side
    mu_star, S_star, info = solve_head_sdp(mu_hat, sigma, theta, theta0, 0.1, return_info=True)
    assert info["status"] == "identity_feasible" and info["objective"] == 0.0
    np.testing.assert_array_equal(mu_star, mu_hat)
    np.testing.assert_allclose(S_star, sqrtm_psd(sigma), atol=1e-12)
    A, b = ot_map(mu_hat, sigma, mu_star, S_star)
    np.testing.assert_allclose(A, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(b, 0, atol=1e-10)


# -----------------------------------------------------------------------------
# the map does what it promises


def test_map_pushes_forward_nondegenerate():
    d, gamma, N = 3, 0.1, 200_000
    mu_hat, sigma, theta, theta0 = make_instance(d, gamma, "pos_m", seed=7)
    mu_star, S_star = solve_head_sdp(mu_hat, sigma, theta, theta0, gamma)
    A, b = ot_map(mu_hat, sigma, mu_star, S_star)
    np.testing.assert_array_equal(A, A.T)
    assert np.linalg.eigvalsh(A)[0] >= 0  # an OT map is the gradient of a convex function

    X = np.random.default_rng(0).multivariate_normal(mu_hat, sigma, size=N)
    Y = X @ A.T + b
    C = S_star @ S_star  # target covariance
    # 5 standard errors: Var(mean_i) = C_ii / N, Var(cov_ij) = (C_ii C_jj + C_ij^2) / N for a Gaussian
    assert np.all(np.abs(Y.mean(0) - mu_star) <= 5 * np.sqrt(np.diag(C) / N))
    se_cov = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / N)
    assert np.all(np.abs(np.cov(Y.T) - C) <= 5 * se_cov)
    # the chance constraint is active: P(desirable) = 1 - gamma exactly for the Gaussian
    p = np.mean(theta0 + Y @ theta <= 0)
    slack = 5 * math.sqrt(gamma * (1 - gamma) / N)
    assert p >= 1 - gamma - slack
    assert abs(p - (1 - gamma)) <= slack
    # before the map far fewer were desirable
    assert np.mean(theta0 + X @ theta <= 0) < 1 - gamma - 10 * slack


def test_map_degenerate_lands_on_boundary():
    d, gamma, N = 3, 0.1, 200_000
    mu_hat, sigma, theta, theta0 = make_instance(d, gamma, "degenerate", seed=8)
    mu_star, S_star = solve_head_sdp(mu_hat, sigma, theta, theta0, gamma)
    assert np.linalg.eigvalsh(S_star)[0] <= 1e-12  # S* singular: its null space is span(theta)
    A, b = ot_map(mu_hat, sigma, mu_star, S_star)
    assert np.all(np.isfinite(A)) and np.all(np.isfinite(b))

    X = np.random.default_rng(1).multivariate_normal(mu_hat, sigma, size=N)
    Y = X @ A.T + b
    # every mapped point sits on the decision boundary (logit 0 up to rounding), so
    # "<= 0" holds only with a rounding tolerance; strictly it is about half the points
    logit = theta0 + Y @ theta
    tol = 1e-9 * (abs(theta0) + np.abs(Y) @ np.abs(theta))
    assert np.all(np.abs(logit) <= tol)
    assert np.mean(logit <= tol) >= 1 - gamma
    C = S_star @ S_star
    assert np.all(np.abs(Y.mean(0) - mu_star) <= 5 * np.sqrt(np.diag(C) / N) + 1e-12)


@pytest.mark.parametrize("regime", ["pos_m", "degenerate"])
def test_head_map_from_moments_matches_two_steps(regime):
    mu_hat, sigma, theta, theta0 = make_instance(10, 0.1, regime, seed=12)
    mu_star, S_star = solve_head_sdp(mu_hat, sigma, theta, theta0, 0.1)
    A, b = ot_map(mu_hat, sigma, mu_star, S_star)
    A2, b2, info = head_map_from_moments(mu_hat, sigma, theta, theta0, 0.1)
    np.testing.assert_allclose(A2, A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b2, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(info["S_star"], S_star, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(A2 @ sigma @ A2, S_star @ S_star, atol=1e-10)


def test_ot_map_finite_for_singular_target():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((5, 5))
    sigma = W @ W.T + np.eye(5)
    mu_hat, mu_star = rng.standard_normal(5), rng.standard_normal(5)
    A, b = ot_map(mu_hat, sigma, mu_star, np.zeros((5, 5)))  # collapse to a point
    np.testing.assert_allclose(A, 0, atol=1e-12)
    np.testing.assert_allclose(b, mu_star, atol=1e-12)
    P = np.diag([1.0, 1, 1, 1, 0])  # rank-deficient target
    A, b = ot_map(mu_hat, sigma, mu_star, P)
    assert np.all(np.isfinite(A))
    np.testing.assert_allclose(A @ sigma @ A, P @ P, atol=1e-10)


# -----------------------------------------------------------------------------
# covariance, fit_head_map, fit_layer_maps


def test_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    X = np.random.default_rng(4).standard_normal((40, 10)) @ np.diag(np.linspace(0.5, 3, 10))
    mu, sig, info = regularize_covariance(X)
    lw = sk.LedoitWolf().fit(X)
    np.testing.assert_allclose(sig, lw.covariance_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mu, lw.location_, rtol=1e-12)
    assert info["shrinkage"] == pytest.approx(lw.shrinkage_, rel=1e-10)


@pytest.mark.parametrize("method", ["ledoit_wolf", "ridge"])
def test_covariance_positive_definite(method):
    X = np.random.default_rng(5).standard_normal((3, 8))  # n < d: the sample covariance is singular
    _, sig, info = regularize_covariance(X, method=method, ridge=1e-3)
    assert np.linalg.eigvalsh(sig)[0] > 0
    assert info["method"] == method
    if method == "ridge":
        assert info["ridge"] == 1e-3 and info["shrinkage"] == 0.0
    _, sig, info = regularize_covariance(np.ones((4, 3)), method=method)  # all rows equal
    assert np.linalg.eigvalsh(sig)[0] > 0 and info["ridge"] > 0


# the published code: sklearn.covariance.empirical_covariance, i.e. maximum likelihood (1/n), no shrinkage


def test_empirical_covariance_is_maximum_likelihood():
    sk = pytest.importorskip("sklearn.covariance")
    X = np.random.default_rng(12).standard_normal((40, 6)) @ np.diag(np.linspace(0.5, 3, 6)) + 1.0
    mu, sig, info = regularize_covariance(X, method="empirical")
    np.testing.assert_allclose(sig, np.cov(X, rowvar=False, bias=True), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sig, sk.empirical_covariance(X), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(mu, X.mean(0), rtol=1e-14)
    assert info["jitter"] == 0.0 and info["shrinkage"] == 0.0 and info["ridge"] == 0.0


def test_empirical_head_map_is_the_published_one():
    rng = np.random.default_rng(13)
    acts = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 5)) + 1.0
    theta = rng.standard_normal(5)
    theta0 = 1.0 - theta @ acts.mean(0)
    hm = fit_head_map(acts, theta, theta0, 0.1, cov="empirical")
    A, b, _ = head_map_from_moments(acts.mean(0), np.cov(acts, rowvar=False, bias=True), theta, theta0, 0.1)
    assert hm.info["status"] == "moved" and hm.info["jitter"] == 0.0 and hm.info["cov"] == "empirical"
    # rounding differences of the two covariance sums (1e-16), amplified by the root finding
    np.testing.assert_allclose(hm.A, A, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(hm.b, b, rtol=1e-7, atol=1e-9)


def test_empirical_rank_deficient_is_jittered_and_reported(caplog):
    rng = np.random.default_rng(14)
    n, d = 5, 12  # fewer flagged samples than dimensions: the empirical covariance is singular
    X = rng.standard_normal((n, d))
    C = np.cov(X, rowvar=False, bias=True)
    w = np.linalg.eigvalsh(C)
    _, sig, info = regularize_covariance(X, method="empirical")
    # the least multiple of I that lifts the smallest eigenvalue to lambda_max / MAX_CONDITION
    assert info["jitter"] == pytest.approx(w[-1] / MAX_CONDITION - w[0], rel=1e-9) and info["jitter"] > 0
    np.testing.assert_allclose(sig, C + info["jitter"] * np.eye(d), rtol=0, atol=1e-15)
    ws = np.linalg.eigvalsh(sig)
    assert ws[0] > 0 and ws[-1] / ws[0] == pytest.approx(MAX_CONDITION, rel=1e-3)

    theta = rng.standard_normal(d)
    hm = fit_head_map(X, theta, 5.0 - theta @ X.mean(0), gamma=0.05, cov="empirical")
    assert hm.info["status"] == "moved" and hm.info["jitter"] == pytest.approx(info["jitter"])
    assert hm.info["jitter_rel"] == pytest.approx(info["jitter"] / (np.trace(C) / d))
    assert np.all(np.isfinite(hm.A)) and np.all(np.isfinite(hm.b))

    # a layer: head 0 flags 5 rows (jittered), head 1 flags all 40 (positive definite as it is)
    acts = rng.standard_normal((40, 2, d))
    weight = np.stack([np.eye(d)[0], theta])
    bias = np.array([0.0, 50.0])
    acts[:, 0, 0] = np.where(np.arange(40) < n, 1.0, -1.0)
    A, b, infos = fit_layer_maps(acts, weight, bias, 0.1, cov="empirical")
    assert [i["n_samples"] for i in infos] == [n, 40] and infos[0]["jitter"] > 0 and infos[1]["jitter"] == 0.0
    assert np.all(np.isfinite(A)) and np.all(np.isfinite(b))
    (line,) = [r.getMessage() for r in caplog.records if "not positive definite" in r.getMessage()]
    assert line.startswith("1 of 2 heads' covariances") and "head 0 (5 samples)" in line and "\n" not in line
    assert f"{infos[0]['jitter']:.3g}" in line


def test_empirical_all_rows_equal_and_too_few(caplog):
    theta = np.ones(4)
    hm = fit_head_map(np.ones((3, 4)), theta, 1.0, gamma=0.1, cov="empirical")  # zero covariance
    assert hm.info["jitter"] == pytest.approx(1 / MAX_CONDITION) and np.all(np.isfinite(hm.A))
    assert hm.info["status"] == "moved" and "jitter_rel" not in hm.info
    # no minimum count beyond the 2 rows a covariance needs
    cfg = SlimConfig()
    assert (cfg.cov, cfg.min_samples) == ("empirical", 2)
    assert SlimConfig(cov="ledoit_wolf").min_samples == 10 and SlimConfig(min_samples=7).min_samples == 7
    two = fit_head_map(np.array([[0.0, 1, 2, 3], [1.0, 0, 2, 1]]), theta, 1.0, 0.1, cfg.min_samples, cfg.cov)
    assert two.info["status"] == "moved" and two.info["jitter"] > 0
    one = fit_head_map(np.ones((1, 4)), theta, 1.0, 0.1, cfg.min_samples, cfg.cov)
    assert one.info["status"] == "identity_too_few"
    np.testing.assert_array_equal(one.A, np.eye(4))
    assert any("a covariance needs 2" in r.getMessage() for r in caplog.records)


def test_fit_head_map_moves_and_reports():
    rng = np.random.default_rng(6)
    d = 8
    acts = rng.standard_normal((500, d)) + 2.0
    theta = rng.standard_normal(d)
    theta0 = 1.0 - theta @ acts.mean(0)  # logit about +1 at the mean
    hm = fit_head_map(acts, theta, theta0, gamma=0.1)
    assert isinstance(hm, HeadMap) and hm.A.shape == (d, d) and hm.b.shape == (d,)
    info = hm.info
    assert info["status"] == "moved" and info["n_samples"] == 500
    assert 0.0 <= info["shrinkage"] <= 1.0
    for key in ("objective", "mu_shift_norm", "A_minus_I_fro"):
        assert np.isfinite(info[key]) and info[key] > 0
    assert info["A_minus_I_fro"] == pytest.approx(np.linalg.norm(hm.A - np.eye(d)))
    # the mapped sample mean meets the constraint (mu* moved to or past the boundary)
    assert theta0 + theta @ (hm.A @ acts.mean(0) + hm.b) <= 1e-9


def test_fit_head_map_rank_deficient_never_nan():
    rng = np.random.default_rng(7)
    acts = rng.standard_normal((3, 16))
    theta = rng.standard_normal(16)
    hm = fit_head_map(acts, theta, 5.0 - theta @ acts.mean(0), gamma=0.05)
    assert hm.info["status"] == "moved"
    assert np.all(np.isfinite(hm.A)) and np.all(np.isfinite(hm.b))


def test_fit_head_map_feasible_identity():
    acts = np.random.default_rng(8).standard_normal((50, 4))
    hm = fit_head_map(acts, np.ones(4), -100.0, gamma=0.1)
    assert hm.info["status"] == "identity_feasible"
    np.testing.assert_array_equal(hm.A, np.eye(4))
    np.testing.assert_array_equal(hm.b, np.zeros(4))


@pytest.mark.parametrize("n, min_samples", [(0, None), (1, None), (5, 10)])
def test_fit_head_map_too_few_warns(n, min_samples, caplog):
    acts = np.ones((n, 4))
    hm = fit_head_map(acts, np.ones(4), 1.0, gamma=0.1, min_samples=min_samples)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "min_samples" in caplog.records[0].getMessage()
    assert hm.info["status"] == "identity_too_few" and hm.info["n_samples"] == n
    np.testing.assert_array_equal(hm.A, np.eye(4))
    np.testing.assert_array_equal(hm.b, np.zeros(4))


def test_fit_layer_maps_selects_by_probe(caplog):
    rng = np.random.default_rng(9)
    N, H, d = 300, 3, 4
    acts = rng.standard_normal((N, H, d)).astype(np.float32)
    weight = rng.standard_normal((H, d))
    bias = np.array([0.5, 0.0, -50.0])  # head 2's probe never predicts undesirable
    A, b, infos = fit_layer_maps(acts, weight, bias, gamma=0.1)
    assert any("head 2" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert A.shape == (H, d, d) and A.dtype == np.float32
    assert b.shape == (H, d) and b.dtype == np.float32
    assert [i["head"] for i in infos] == [0, 1, 2]
    for h in range(H):
        p = 1 / (1 + np.exp(-(acts[:, h].astype(np.float64) @ weight[h] + bias[h])))
        sel = p > 0.5
        assert infos[h]["n_samples"] == sel.sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hm = fit_head_map(acts[sel, h], weight[h], bias[h], 0.1)
        np.testing.assert_array_equal(A[h], hm.A.astype(np.float32))
        np.testing.assert_array_equal(b[h], hm.b.astype(np.float32))
    assert infos[0]["status"] == "moved" and infos[2]["status"] == "identity_too_few"


def test_fit_layer_maps_accepts_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    acts, weight, bias = rng.standard_normal((64, 2, 3)), rng.standard_normal((2, 3)), np.ones(2)
    A1, b1, _ = fit_layer_maps(acts, weight, bias, 0.1)
    A2, b2, _ = fit_layer_maps(torch.tensor(acts), torch.tensor(weight), torch.tensor(bias), 0.1)
    np.testing.assert_array_equal(A1, A2)
    np.testing.assert_array_equal(b1, b2)


# -----------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize("gamma", [0.0, 0.5, -0.1, 0.7, float("nan")])
def test_bad_gamma(gamma):
    mu_hat, sigma, theta, theta0 = make_instance(4, 0.1, "pos_m", seed=0)
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 0.5\), got"):
        solve_head_sdp(mu_hat, sigma, theta, theta0, gamma)
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 0.5\)"):
        fit_head_map(np.ones((1, 4)), theta, theta0, gamma)  # checked before the too-few fallback
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 0.5\)"):
        fit_layer_maps(np.ones((5, 2, 4)), np.ones((2, 4)), np.zeros(2), gamma)


def test_bad_inputs():
    mu_hat, sigma, theta, theta0 = make_instance(4, 0.1, "pos_m", seed=0)
    with pytest.raises(ValueError, match="theta must have shape"):
        solve_head_sdp(mu_hat, sigma, np.ones(5), theta0, 0.1)
    with pytest.raises(ValueError, match="sigma_hat must have shape"):
        solve_head_sdp(mu_hat, np.eye(5), theta, theta0, 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        solve_head_sdp(np.array([0.0, np.nan, 0, 0]), sigma, theta, theta0, 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        solve_head_sdp(mu_hat, sigma, theta, np.inf, 0.1)
    bad = sigma.copy()
    bad[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        solve_head_sdp(mu_hat, bad, theta, theta0, 0.1)
    with pytest.raises(ValueError, match="not positive semidefinite"):
        solve_head_sdp(mu_hat, sigma - 10 * np.eye(4), theta, theta0, 0.1)
    with pytest.raises(ValueError, match="positive definite"):
        ot_map(mu_hat, np.diag([1.0, 1, 1, 0]), mu_hat, np.eye(4))
    with pytest.raises(ValueError, match="mu_star must have shape"):
        ot_map(mu_hat, sigma, np.ones(3), np.eye(4))
    with pytest.raises(ValueError, match="weight/bias must have shapes"):
        fit_layer_maps(np.ones((5, 2, 4)), np.ones((3, 4)), np.zeros(2), 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        fit_head_map(np.full((5, 4), np.nan), theta, theta0, 0.1)
    # every message is one line
    try:
        solve_head_sdp(mu_hat, bad, theta, theta0, 0.1)
    except ValueError as e:
        assert "\n" not in str(e)


# -----------------------------------------------------------------------------
# safetensors I/O


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(11)
    acts = rng.standard_normal((200, 2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        A, b, infos = fit_layer_maps(acts, rng.standard_normal((2, 5)), np.array([1.0, -80.0]), 0.1)
    meta = {"layer": 7, "gamma": 0.1, "model": "smollm2-135m", "nested": {"tau": np.int64(3)}}
    path = tmp_path / "maps.safetensors"
    save_layer_maps(path, A, b, infos, meta)
    # no temporary file left behind; the record of size and sha256 beside it
    assert sorted(os.listdir(tmp_path)) == ["maps.safetensors", "maps.safetensors.sha256.json"]
    A2, b2, infos2, meta2 = load_layer_maps(path)
    assert A2.dtype == A.dtype and b2.dtype == b.dtype
    np.testing.assert_array_equal(A2, A)
    np.testing.assert_array_equal(b2, b)
    assert infos2 == infos
    assert meta2 == {**meta, "nested": {"tau": 3}}
    save_layer_maps(path, A, b, infos, meta)  # overwriting an existing file works too
    np.testing.assert_array_equal(load_layer_maps(path)[0], A)
    with open(path, "rb") as f:  # safetensors, not pickle
        header_len = int.from_bytes(f.read(8), "little")
        assert f.read(1) == b"{" and header_len > 0
