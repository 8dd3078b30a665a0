"""The probe losses (paper eq. 2 and the ablations) and their hand-written gradient.

p (N, P) are the probes' probabilities of "undesirable", y (N,) the labels
(1 = undesirable), results (P,): one loss per probe. The smooth risk is
E[p | y=0] + bl * E[1 - p | y=1] (a differentiable FPR + bl * FNR); the hard
risk, FPR + bl * FNR of the thresholded p, picks checkpoints and tau.
`fit_one_probe` trains one probe on them with nn.Linear + torch.optim.Adam + autograd: the reference
the batched trainer (slim.stage1.probes) is checked against.
"""

import math

import torch
import torch.nn as nn

from ..config import LOSS_TYPES


def _labels_like(p, y):
    """y (N,) as a float column (N, 1) matching p (N, P)."""
    y = torch.as_tensor(y, device=p.device)
    if p.ndim != 2 or y.shape != p.shape[:1]:
        raise ValueError(f"p must be (N, P) and y (N,), got {tuple(p.shape)} and {tuple(y.shape)}")
    return y.to(p.dtype).unsqueeze(1)


def _l2_penalty(beta, weight, like):
    # beta * ||theta||^2 on the slopes only; the bias is not regularised (eq. 2)
    if weight is None or beta == 0:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return beta * (weight * weight).sum(-1)


def smooth_risk_loss(p, y, bl=1.0, beta=0.0, weight=None):
    """Paper eq. 2: smooth FPR + bl * smooth FNR + beta * ||theta||^2, per probe.

    smooth FPR = sum_i p_i (1 - y_i) / N0,  smooth FNR = sum_i (1 - p_i) y_i / N1.
    p (N, P), y (N,), weight (P, d) or None -> (P,)
    """
    y = _labels_like(p, y)  # (N, 1)
    n1 = y.sum()
    n0 = y.numel() - n1
    fpr = (p * (1 - y)).sum(0) / n0
    fnr = ((1 - p) * y).sum(0) / n1
    return fpr + bl * fnr + _l2_penalty(beta, weight, p)


def cross_entropy_loss(p, y, beta=0.0, weight=None):
    """Mean binary cross-entropy (+ beta ||theta||^2): the ablation of paper Table 3.

    Computed from probabilities, so log is clamped at -100 as in torch's BCELoss.
    p (N, P), y (N,) -> (P,)
    """
    y = _labels_like(p, y).expand_as(p)
    bce = nn.functional.binary_cross_entropy(p, y, reduction="none").mean(0)
    return bce + _l2_penalty(beta, weight, p)


def l2_loss(p, y, beta=0.0, weight=None):
    """Mean squared error between p and y (+ beta ||theta||^2). p (N, P) -> (P,)"""
    y = _labels_like(p, y)
    return ((p - y) ** 2).mean(0) + _l2_penalty(beta, weight, p)


def probe_loss(loss_type, p, y, bl=1.0, beta=0.0, weight=None):
    """The smooth training loss named by loss_type, per probe: (P,)."""
    if loss_type == "risk":
        return smooth_risk_loss(p, y, bl, beta, weight)
    if loss_type == "cross_entropy":
        return cross_entropy_loss(p, y, beta, weight)
    if loss_type == "l2":
        return l2_loss(p, y, beta, weight)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def risk_from_counts(fp, fn, n0, n1, bl):
    # the one formula for the hard loss, shared by every caller so that equal
    # counts give bit-identical losses (checkpoint ties then break the same way)
    return fp / n0 + bl * (fn / n1)


def hard_risk_loss(p, y, bl=1.0):
    """Hard FPR + bl * FNR with the decision p > 0.5. p (N, P), y (N,) -> (P,) float64."""
    pred = p > 0.5
    pos = _labels_like(p, y).bool()  # (N, 1)
    n1 = int(pos.sum())
    n0 = pos.shape[0] - n1
    fp = (pred & ~pos).sum(0).double()
    fn = (~pred & pos).sum(0).double()
    return risk_from_counts(fp, fn, n0, n1, bl)


# -----------------------------------------------------------------------------
# the hand-written gradient


def row_coef(loss_type, y, bl):
    """Per-row constant of dL/dz: (N,). y is a float tensor of 0/1."""
    n = y.numel()
    n1 = float(y.sum())
    n0 = n - n1
    if loss_type == "risk":
        # dL/dp_i = (1 - y_i)/N0 - bl y_i/N1, and dp/dz = p (1 - p)
        return (1 - y) / n0 - bl * y / n1
    # cross_entropy: dL/dz = (p - y)/N;  l2: dL/dz = 2 (p - y) p (1 - p) / N
    return torch.full_like(y, 1.0 / n if loss_type == "cross_entropy" else 2.0 / n)


def logit_grad(loss_type, p, y, coef, out, tmp):
    """dL/dz for every probe and row, written into out. p, out, tmp (P, N); y, coef (N,)."""
    if loss_type == "cross_entropy":
        torch.sub(p, y, out=out)
    else:
        torch.mul(p, p, out=tmp)
        torch.sub(p, tmp, out=out)  # p (1 - p)
        if loss_type == "l2":
            torch.sub(p, y, out=tmp)
            out.mul_(tmp)
    out.mul_(coef)
    return out


def theta_grad(loss_type, XT, theta, n_train, y, coef, beta):
    """Full gradient of the smooth loss w.r.t. theta = [w | b] (P, d+1), no buffers.

    XT (P, d+1, N_total) with the ones row last; the first n_train columns are
    the training rows. Used by the tests; the training loop does the same
    computation into preallocated buffers.
    """
    z = torch.bmm(theta.unsqueeze(1), XT[:, :, :n_train]).squeeze(1)  # (P, N)
    p = torch.sigmoid(z)
    g = logit_grad(loss_type, p, y, coef, torch.empty_like(p), torch.empty_like(p))
    grad = torch.bmm(g.unsqueeze(1), XT[:, :, :n_train].transpose(1, 2)).squeeze(1)
    grad[:, :-1] += 2 * beta * theta[:, :-1]
    return grad


# -----------------------------------------------------------------------------
# the one-probe reference trainer


def fit_one_probe(
    x,
    y,
    x_val,
    y_val,
    w0,
    b0=0.0,
    loss_type="risk",
    bl=1.0,
    beta=0.0,
    epochs=1000,
    lr=2e-3,
    dtype=torch.float32,
    checkpoint="last",
):
    """Reference trainer: one probe, nn.Linear + torch.optim.Adam + autograd.

    x (N, d), x_val (N_val, d), w0 (d,). Full-batch epochs; after each epoch the
    hard val loss is computed. Keeps the last epoch's parameters
    (checkpoint "last") or the earliest best ones ("best").
    Returns (weight (d,), bias float, kept epoch in 1..epochs, its hard val loss).
    """
    x = torch.as_tensor(x).to(dtype)
    x_val = torch.as_tensor(x_val).to(dtype)
    y = torch.as_tensor(y).to(dtype)
    y_val = torch.as_tensor(y_val).to(dtype)
    lin = nn.Linear(x.shape[1], 1).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(w0).reshape(1, -1))
        lin.bias.fill_(float(b0))
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    best = (math.inf, 0, None, None)
    for epoch in range(1, epochs + 1):
        p = torch.sigmoid(lin(x))  # (N, 1)
        loss = probe_loss(loss_type, p, y, bl, beta, lin.weight).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = float(hard_risk_loss(torch.sigmoid(lin(x_val)), y_val, bl)[0])
        if checkpoint == "last" or val < best[0]:  # "best": strict <, so the earliest best epoch wins ties
            best = (val, epoch, lin.weight.detach()[0].clone(), float(lin.bias.detach()[0]))
    return best[2], best[3], best[1], best[0]
