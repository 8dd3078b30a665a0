"""Stage 2: the head-wise chance-constrained problem (paper eq. 4) and its Gaussian OT map.

For one head with probe p(a) = sigmoid(theta0 + theta . a) (P(undesirable)) and
the predicted-undesirable activations ~ N(mu_hat, Sigma_hat), SLIM looks for the
Gaussian N(mu, S^2) closest to it in the moment distance

    ||mu - mu_hat||^2 + ||S - Sigma_hat^(1/2)||_F^2

whose mass is classified desirable with probability >= 1 - gamma, i.e.

    theta0 + theta . mu + q ||S theta|| <= 0,   q = Phi^-1(1 - gamma) > 0.

The paper solves this as an SDP (MOSEK, ~50 s a head at d = 128). Here it is
solved exactly by the one-dimensional reduction of shared/docs/closed-form-ot.md:

    n = ||theta||, u = theta / n, m = theta0 + theta . mu_hat, R = Sigma_hat^(1/2)
    r_a = u.R u, v = R u - r_a u (the part of R u orthogonal to u), rho = ||R u||

With the budget s = ||S u|| in [0, rho] fixed, the mean is a half-space
projection (it moves by c(s) / n along -u, c(s) = max(0, m + q n s)) and S u,
written (a, b) in the basis (u, u_perp), is a weighted projection of R u onto
the ball of radius s with multiplier lam >= 0; the rest of S equals R. We
parametrize the pair (s, lam) by t = 1 / (1 + lam) in [0, 1]; then the inner
root for lam is explicit,

    s(t) = t * w(t),   lam(t) s(t) = (1 - t) * w(t),   w(t) = sqrt(r_a^2 + 4 |v|^2 / (1 + t)^2),

s(t) increases from 0 to rho, and t = 0 (lam = inf, s = 0: the degenerate
optimum seen on real activations) is an ordinary end point instead of a limit.
The outer objective f(s) is convex with f'(s) / 2 = q c(s) / n - lam(s) s (the
covariance cost has derivative -2 lam s by the envelope theorem), increasing
in t, so the optimum is its bracketed root (brentq to machine precision), or
t = 0 when f' >= 0 there already.

The map from N(mu_hat, Sigma_hat) to N(mu*, S*^2) is A x + b with
A = R^-1 (R S*^2 R)^(1/2) R^-1 and b = mu* - A mu_hat.
"""

import logging

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from ..config import check_gamma

log = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# input checks (one-line ValueErrors; other modules rely on the messages)


def _as_float_array(x, name, ndim=None):
    if hasattr(x, "detach"):  # torch tensor -> numpy without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return x


def _check_vector(x, name, d):
    x = _as_float_array(x, name, ndim=1)
    if x.shape != (d,):
        raise ValueError(f"{name} must have shape ({d},), got {x.shape}")
    return x


def _check_symmetric(x, name, d):
    x = _as_float_array(x, name, ndim=2)
    if x.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}), got {x.shape}")
    scale = max(np.abs(x).max(), np.finfo(np.float64).tiny)
    if np.abs(x - x.T).max() > 1e-8 * scale:
        raise ValueError(f"{name} is not symmetric (max |X - X^T| = {np.abs(x - x.T).max():.3g})")
    return 0.5 * (x + x.T)


def _sym_eig(x, name, d):
    """Symmetric eigendecomposition of a PSD matrix; tiny negative eigenvalues clipped to 0."""
    w, V = np.linalg.eigh(x)  # w ascending
    # rounding makes PSD matrices show eigenvalues around -d * eps * ||x||: tolerate those only
    tol = 100 * d * np.finfo(np.float64).eps * max(np.abs(w).max(), np.finfo(np.float64).tiny)
    if w[0] < -tol:
        raise ValueError(f"{name} is not positive semidefinite (min eigenvalue {w[0]:.3g})")
    return np.clip(w, 0.0, None), V


def _sqrt_from_eig(w, V):
    """R = V diag(sqrt(w)) V^T, symmetrized."""
    R = (V * np.sqrt(w)) @ V.T
    return 0.5 * (R + R.T)


def sqrtm_psd(x, name="x", d=None):
    """PSD square root (d, d) of a symmetric PSD x (d, d); also used by slim.policies."""
    return _sqrt_from_eig(*_sym_eig(x, name, x.shape[0] if d is None else d))


# -----------------------------------------------------------------------------
# the exact solution of the head-wise problem


def _solve_reduced(mu_hat, R, theta, theta0, q):
    """Core of solve_head_sdp on validated inputs; also returns diagnostics."""
    n = np.linalg.norm(theta)
    u = theta / n  # (d,) unit normal of the probe's decision boundary
    m = theta0 + theta @ mu_hat  # probe logit at the current mean
    Ru = R @ u
    r_a = float(u @ Ru)
    v = Ru - r_a * u  # (d,) the part of R u orthogonal to u
    beta2 = float(v @ v)
    rho = float(np.linalg.norm(Ru))  # largest useful budget s = ||S u||

    def width(t):  # ||S u|| / t as a function of t = 1 / (1 + lam)
        return np.sqrt(r_a * r_a + 4.0 * beta2 / (1.0 + t) ** 2)

    def c_of(t):  # how far the mean must move along -u (times n)
        return max(0.0, m + q * n * t * width(t))

    def half_fprime(t):  # f'(s) / 2 at s = s(t): increasing in t
        return q * c_of(t) / n - (1.0 - t) * width(t)

    if half_fprime(0.0) >= 0.0:
        t = 0.0  # spread along theta collapses: S* u = 0 (degenerate but finite)
    elif half_fprime(1.0) <= 0.0:
        t = 1.0  # only when the constraint is violated by a rounding error: keep S = R
    else:
        # half_fprime(1) = q c(rho) / n > 0 because the constraint is violated at S = R
        t = brentq(half_fprime, 0.0, 1.0, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=200)

    c = c_of(t)
    mu_star = mu_hat - (c / n) * u
    shrink_a = r_a * (1.0 - t)  # = r_a lam / (1 + lam)
    shrink_b = (1.0 - t) / (1.0 + t)  # = lam / (2 + lam)
    S_star = R - shrink_a * np.outer(u, u) - shrink_b * (np.outer(v, u) + np.outer(u, v))
    S_star = 0.5 * (S_star + S_star.T)
    objective = (c / n) ** 2 + shrink_a**2 + 2.0 * beta2 * shrink_b**2
    diag = dict(
        t=float(t),
        s_star=float(t * width(t)),
        rho=rho,
        objective=float(objective),
        margin_before=float(m + q * n * rho),
    )
    return mu_star, S_star, diag


def _solve_head(mu_hat, R, theta, theta0, q):
    """solve_head_sdp on validated inputs with R = Sigma_hat^(1/2) given: (mu*, S*, info)."""
    n = np.linalg.norm(theta)
    if n == 0.0:
        if theta0 > 0.0:
            raise ValueError(f"theta is zero and theta0 = {theta0} > 0: the constraint cannot be met")
        margin, rho = theta0, 0.0
    else:
        rho = float(np.linalg.norm(R @ theta) / n)
        margin = theta0 + theta @ mu_hat + q * n * rho

    if margin <= 0.0:  # already classified desirable with probability >= 1 - gamma
        info = dict(status="identity_feasible", objective=0.0, t=1.0, s_star=rho, rho=rho, margin_before=float(margin))
        return mu_hat.copy(), R.copy(), info
    mu_star, S_star, info = _solve_reduced(mu_hat, R, theta, theta0, q)
    info["status"] = "moved"
    return mu_star, S_star, info


def _check_head_inputs(mu_hat, sigma_hat, theta, theta0, gamma):
    gamma = check_gamma(gamma)
    mu_hat = _as_float_array(mu_hat, "mu_hat", ndim=1)
    d = mu_hat.shape[0]
    sigma_hat = _check_symmetric(sigma_hat, "sigma_hat", d)
    theta = _check_vector(theta, "theta", d)
    theta0 = float(_as_float_array(theta0, "theta0", ndim=0))
    return mu_hat, sigma_hat, theta, theta0, gamma, d


def solve_head_sdp(mu_hat, sigma_hat, theta, theta0, gamma, return_info=False):
    """Exact solution of the head-wise chance-constrained problem (paper eq. 4).

    min ||mu - mu_hat||^2 + ||S - Sigma_hat^(1/2)||_F^2
    s.t. theta0 + theta . mu + Phi^-1(1 - gamma) ||S theta|| <= 0,  S PSD.

    Parameters
    ----------
    mu_hat : (d,) mean of the predicted-undesirable activations.
    sigma_hat : (d, d) symmetric PSD covariance.
    theta, theta0 : (d,) weight and float bias of the head probe (logit > 0 = undesirable).
    gamma : tolerance in (0, 0.5).
    return_info : also return a dict (status, objective, s_star = ||S* u||, t, margin_before).

    Returns
    -------
    mu_star (d,), S_star (d, d) symmetric PSD; (mu_hat, Sigma_hat^(1/2)) when the
    constraint already holds.
    """
    mu_hat, sigma_hat, theta, theta0, gamma, d = _check_head_inputs(mu_hat, sigma_hat, theta, theta0, gamma)
    R = sqrtm_psd(sigma_hat, "sigma_hat", d)
    mu_star, S_star, info = _solve_head(mu_hat, R, theta, theta0, float(norm.ppf(1.0 - gamma)))
    return (mu_star, S_star, info) if return_info else (mu_star, S_star)


# -----------------------------------------------------------------------------
# the Gaussian optimal-transport map


def _map_from_eig(w, V, mu_hat, mu_star, S_star):
    """ot_map given the eigendecomposition Sigma_hat = V diag(w) V^T (w clipped >= 0)."""
    d = len(w)
    # R^-1 amplifies errors by 1/sqrt(w_min): refuse (near) singular covariances
    if w[0] <= d * np.finfo(np.float64).eps * w[-1]:
        raise ValueError("sigma_hat must be positive definite for the map (regularize it first)")
    r = np.sqrt(w)
    R = (V * r) @ V.T
    R_inv = (V / r) @ V.T
    K = R @ S_star  # (d, d): R S^2 R = K K^T is PSD by construction
    M = K @ K.T
    wm, Vm = np.linalg.eigh(0.5 * (M + M.T))
    M_half = (Vm * np.sqrt(np.clip(wm, 0.0, None))) @ Vm.T  # singular S -> zero eigenvalues, still finite
    A = R_inv @ M_half @ R_inv
    A = 0.5 * (A + A.T)
    b = mu_star - A @ mu_hat
    return A, b


def ot_map(mu_hat, sigma_hat, mu_star, S_star):
    """Affine OT map x -> A x + b from N(mu_hat, Sigma_hat) to N(mu_star, S_star^2).

    A = R^-1 (R S^2 R)^(1/2) R^-1 with R = Sigma_hat^(1/2) (needs Sigma_hat
    positive definite), b = mu_star - A mu_hat. S_star may be singular.

    Returns
    -------
    A (d, d) symmetric PSD, b (d,).
    """
    mu_hat = _as_float_array(mu_hat, "mu_hat", ndim=1)
    d = mu_hat.shape[0]
    sigma_hat = _check_symmetric(sigma_hat, "sigma_hat", d)
    mu_star = _check_vector(mu_star, "mu_star", d)
    S_star = _check_symmetric(S_star, "S_star", d)
    w, V = _sym_eig(sigma_hat, "sigma_hat", d)
    return _map_from_eig(w, V, mu_hat, mu_star, S_star)


def head_map_from_moments(mu_hat, sigma_hat, theta, theta0, gamma):
    """solve_head_sdp followed by ot_map, sharing one eigendecomposition of Sigma_hat.

    Returns
    -------
    A (d, d), b (d,), info dict as solve_head_sdp(..., return_info=True) plus
    mu_star and S_star; A = I, b = 0 exactly when the constraint already holds.
    """
    mu_hat, sigma_hat, theta, theta0, gamma, d = _check_head_inputs(mu_hat, sigma_hat, theta, theta0, gamma)
    w, V = _sym_eig(sigma_hat, "sigma_hat", d)
    R = _sqrt_from_eig(w, V)
    mu_star, S_star, info = _solve_head(mu_hat, R, theta, theta0, float(norm.ppf(1.0 - gamma)))
    if info["status"] == "identity_feasible":
        A, b = np.eye(d), np.zeros(d)  # exact, not R^-1 (R R^2 R)^(1/2) R^-1 up to rounding
    else:
        A, b = _map_from_eig(w, V, mu_hat, mu_star, S_star)
    return A, b, dict(info, mu_star=mu_star, S_star=S_star)


# -----------------------------------------------------------------------------
# covariance estimation

COV_METHODS = ("empirical", "ledoit_wolf", "ridge")
# "empirical" lifts the smallest eigenvalue to lambda_max / MAX_CONDITION when it is below: R = Sigma^(1/2)
# then has condition number <= 1e5, so R^-1 keeps about 10 significant digits in float64, and the map's own
# positive-definiteness test (lambda_min > d * eps * lambda_max, _map_from_eig) passes for any d below ~4e5
MAX_CONDITION = 1e10


def pd_jitter(C):
    """The least c >= 0 such that C + c I (C (d, d) symmetric PSD) has condition number <= MAX_CONDITION.

    That is max(0, lambda_max / MAX_CONDITION - lambda_min): exactly what lifts the smallest eigenvalue to
    the floor, 0 for a well-conditioned C. A zero C (all rows equal) is lifted to 1 / MAX_CONDITION.
    """
    w = np.linalg.eigvalsh(C)  # ascending
    top = w[-1] if w[-1] > 0 else 1.0
    return float(max(0.0, top / MAX_CONDITION - w[0]))


def regularize_covariance(samples, method="ledoit_wolf", ridge=1e-3):
    """Mean and a positive definite covariance of samples (n, d).

    Every method starts from the maximum-likelihood covariance C (1/n, as
    sklearn.covariance.empirical_covariance, which the published code uses).
    "empirical": C itself (the published code), plus the least multiple of I
    that makes it positive definite when it is not (pd_jitter: n <= d flagged
    rows, or collinear ones), reported as "jitter".
    "ledoit_wolf": (1 - a) C + a (tr C / d) I with the Ledoit-Wolf (2004) optimal a
    (same value as sklearn.covariance.LedoitWolf); a ridge is added on top only
    if the result is still singular. "ridge": C + ridge * (tr C / d) I.

    Returns
    -------
    mu_hat (d,), sigma_hat (d, d), info dict with "method", "shrinkage", "ridge",
    "jitter" (absolute) and "trace_over_d" (the average variance, the scale of both).
    """
    X = _as_float_array(samples, "samples", ndim=2)
    n, d = X.shape
    if n < 1:
        raise ValueError("samples must have at least one row")
    if method not in COV_METHODS:
        raise ValueError(f"method must be one of {', '.join(COV_METHODS)}, got {method!r}")
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")

    mu_hat = X.mean(axis=0)
    Xc = X - mu_hat
    C = Xc.T @ Xc / n  # (d, d) maximum-likelihood covariance
    scale = np.trace(C) / d  # average variance: the shrinkage target is scale * I
    eye = np.eye(d)

    shrinkage, ridge_used, jitter = 0.0, 0.0, 0.0
    if method == "empirical":
        jitter = pd_jitter(C)
        sigma_hat = C + jitter * eye
        info = dict(method=method, shrinkage=0.0, ridge=0.0, jitter=jitter, trace_over_d=float(scale))
        return mu_hat, sigma_hat, info
    if method == "ledoit_wolf" and scale > 0:
        # a = min(1, b2 / d2): b2 = mean squared distance of x x^T to C (/ n), d2 = ||C - scale I||^2
        sq_norms = np.einsum("ij,ij->i", Xc, Xc)  # (n,)
        b2 = (np.mean(sq_norms**2) - np.sum(C * C)) / n
        d2 = np.sum((C - scale * eye) ** 2)
        shrinkage = 1.0 if d2 <= 0 else float(np.clip(b2 / d2, 0.0, 1.0))
        sigma_hat = (1.0 - shrinkage) * C + shrinkage * scale * eye
    else:
        sigma_hat = C.copy()

    if method == "ridge":
        ridge_used = ridge
    else:  # Ledoit-Wolf may still be singular (a = 0 with n <= d, or all rows equal)
        w_min = np.linalg.eigvalsh(sigma_hat)[0]
        if w_min <= 1e-10 * max(scale, 0.0):
            ridge_used = ridge if ridge > 0 else 1e-3
    if ridge_used > 0:
        # scale-free ridge; all-equal rows (scale 0) get an absolute one so the result stays PD
        sigma_hat = sigma_hat + ridge_used * (scale if scale > 0 else 1.0) * eye

    sigma_hat = 0.5 * (sigma_hat + sigma_hat.T)
    info = dict(
        method=method, shrinkage=float(shrinkage), ridge=float(ridge_used), jitter=jitter, trace_over_d=float(scale)
    )
    return mu_hat, sigma_hat, info
