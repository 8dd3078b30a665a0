"""Closed-form head-wise solution vs the SDP of paper eq. 4 in cvxpy, on the same random instances.

    python benchmarks/bench_ot.py --dims 64 128 --n-instances 3 --solver auto

For each d and solver it prints the mean time per head of both methods (SDP:
wall time of cvxpy's solve, compilation included, and the solver's own time;
closed form: solve_head_sdp alone, and the whole head, solve + OT map, as
fit_head_map runs it; best of --repeats), their ratio (SDP wall / whole head)
and the largest objective difference. The SDP is eq. 4 as written (LMI
[[t I, S theta], [theta^T S, t]] >> 0, S PSD). "auto" uses Clarabel (an
interior-point method, accurate but about two minutes a head at d = 128) up to
d = 64 and SCS (first-order, eps 1e-7) above. BLAS runs on one thread unless
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS are set.
"""

import argparse
import math
import os
import sys
import time

# One BLAS thread unless the caller says otherwise: a head is a small problem (one
# 128 x 128 eigh), stage 2 parallelises over heads, and on a shared machine
# OpenBLAS' spinning threads made a 64 x 64 eigh 100x slower. Applies to both methods.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from slim.policies.gaussian_ot import head_map_from_moments, solve_head_sdp  # noqa: E402


def make_instance(d, gamma, degenerate, rng):
    """A random head whose constraint binds; degenerate=True puts the optimum at ||S* u|| = 0."""
    W = rng.standard_normal((d, d))
    sigma = W @ W.T / d + 0.1 * np.eye(d)
    mu = rng.standard_normal(d)
    theta = rng.standard_normal(d)
    w, V = np.linalg.eigh(sigma)
    R = (V * np.sqrt(w)) @ V.T
    n = np.linalg.norm(theta)
    Ru = R @ (theta / n)
    r_a = Ru @ theta / n
    kappa0 = math.sqrt(r_a**2 + 4 * (Ru @ Ru - r_a**2))
    m = (2.0 if degenerate else 0.5) * n * kappa0 / norm.ppf(1 - gamma)  # probe logit at the mean
    return mu, sigma, theta, m - theta @ mu


def solve_cvxpy(mu_hat, sigma, theta, theta0, gamma, solver):
    """Returns (objective, wall seconds of prob.solve, the solver's own seconds)."""
    import cvxpy as cp

    d = len(mu_hat)
    w, V = np.linalg.eigh(sigma)
    R = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    mu = cp.Variable(d)
    S = cp.Variable((d, d), PSD=True)
    t = cp.Variable(nonneg=True)
    St = cp.reshape(S @ theta, (d, 1), order="F")
    lmi = cp.bmat([[t * np.eye(d), St], [St.T, cp.reshape(t, (1, 1), order="F")]])
    prob = cp.Problem(
        cp.Minimize(cp.sum_squares(mu - mu_hat) + cp.sum_squares(S - R)),
        [theta0 + theta @ mu + norm.ppf(1 - gamma) * t <= 0, lmi >> 0],
    )
    opts = dict(eps_abs=1e-7, eps_rel=1e-7, max_iters=200_000) if solver == "SCS" else {}
    t0 = time.perf_counter()
    prob.solve(solver=solver, **opts)  # includes cvxpy's compilation, as a user would pay it
    wall = time.perf_counter() - t0
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"{solver} returned {prob.status}")
    return prob.value, wall, prob.solver_stats.solve_time or float("nan")


def time_closed_form(mu_hat, sigma, theta, theta0, gamma, repeats):
    """Best-of-repeats seconds of solve_head_sdp and of the whole head (solve + map); objective."""
    best_solve = best_total = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, _, info = solve_head_sdp(mu_hat, sigma, theta, theta0, gamma, return_info=True)
        t1 = time.perf_counter()
        head_map_from_moments(mu_hat, sigma, theta, theta0, gamma)  # what fit_head_map runs per head
        t2 = time.perf_counter()
        best_solve, best_total = min(best_solve, t1 - t0), min(best_total, t2 - t1)
    return best_solve, best_total, info["objective"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--n-instances", type=int, default=3, help="random heads per d (half of them degenerate)")
    p.add_argument(
        "--solver",
        choices=["auto", "CLARABEL", "SCS"],
        nargs="+",
        default=["auto"],
        help="one or more SDP solvers; auto = CLARABEL up to d = 64, SCS above",
    )
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=20, help="closed-form timing repeats (best of)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import cvxpy as cp

    print(
        f"numpy {np.__version__}, cvxpy {cp.__version__}, BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, "
        f"gamma {args.gamma}, "
        f"{args.n_instances} instance(s) per d, closed form best of {args.repeats}"
    )
    header = (
        f"{'d':>4} {'solver':>8} {'n':>3} {'SDP s/head':>11} {'(solver s)':>11} "
        f"{'CF solve ms':>11} {'CF head ms':>10} {'ratio':>9} {'max |dobj|':>11} {'max rel':>9}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(args.seed)
    for d in args.dims:
        solvers = [("CLARABEL" if d <= 64 else "SCS") if x == "auto" else x for x in args.solver]
        instances = [make_instance(d, args.gamma, degenerate=(i % 2 == 1), rng=rng) for i in range(args.n_instances)]
        cf = [time_closed_form(*inst, args.gamma, args.repeats) for inst in instances]
        cf_solve, cf_total = np.mean([c[0] for c in cf]), np.mean([c[1] for c in cf])
        for solver in dict.fromkeys(solvers):  # same instances for every solver
            sdp = [solve_cvxpy(*inst, args.gamma, solver) for inst in instances]
            sdp_wall, sdp_own = np.mean([x[1] for x in sdp]), np.mean([x[2] for x in sdp])
            dabs = [abs(x[0] - c[2]) for x, c in zip(sdp, cf)]
            drel = [a / abs(c[2]) for a, c in zip(dabs, cf)]
            ratio = sdp_wall / cf_total  # against the whole closed-form head (solve + map)
            print(
                f"{d:>4} {solver:>8} {args.n_instances:>3} {sdp_wall:>11.3f} {sdp_own:>11.3f} "
                f"{1e3 * cf_solve:>11.3f} {1e3 * cf_total:>10.3f} {ratio:>8.0f}x "
                f"{max(dabs):>11.2e} {max(drel):>9.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
