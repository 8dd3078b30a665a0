"""TinyMLP: the offline judge's small classifier on standardised features (torch, safetensors)."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__package__)  # "slim.judges", as before the package split


class TinyMLP:
    """Two-hidden-layer MLP classifier on standardised features (torch), saved with safetensors.

    Trained with the positive class re-weighted to balance the classes
    (the judges are measured by balanced accuracy; info is 80 % "yes").
    """

    def __init__(
        self,
        hidden: int = 64,
        epochs: int = 30,
        lr: float = 3e-3,
        weight_decay: float = 1e-3,
        dropout: float = 0.1,
        batch_size: int = 256,
        seed: int = 0,
    ):
        self.hidden, self.epochs, self.lr = hidden, epochs, lr
        self.weight_decay, self.dropout, self.batch_size, self.seed = weight_decay, dropout, batch_size, seed
        self.net = None
        self.mean_ = self.scale_ = None

    def get_params(self) -> dict:
        return {
            "hidden": self.hidden,
            "epochs": self.epochs,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "dropout": self.dropout,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def _build(self, n_features: int):
        import torch

        nn = torch.nn
        return nn.Sequential(
            nn.Linear(n_features, self.hidden),
            nn.GELU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, 1),
        )

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "TinyMLP":
        """Fit on rows X (n, features) with labels y; `sample_weight` (n,) counts a row that many times."""
        import torch

        y = np.asarray(y, dtype=np.float32)
        if len(np.unique(y)) < 2:
            raise ValueError("the judge's training labels are all one class: give it both ' yes' and ' no' rows.")
        w = np.ones(len(y), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        if w.shape != y.shape or not np.all(np.isfinite(w) & (w >= 0)) or w.sum() <= 0:
            raise ValueError(f"sample_weight must be {len(y)} finite weights >= 0, not all 0.")
        self.mean_ = X.mean(0).astype(np.float32)
        self.scale_ = (X.std(0) + 1e-6).astype(np.float32)
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # initial weights and dropout
        self.net = self._build(X.shape[1])
        inputs = torch.from_numpy((X - self.mean_) / self.scale_).float()
        targets = torch.from_numpy(y)
        weights = torch.from_numpy(w / w.mean())
        share_yes = float((w * y).sum() / w.sum())  # weighted, so the balance is that of the weighted data
        pos_weight = torch.tensor((1 - share_yes) / share_yes)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.net.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation (10x slower on a busy CPU)
        try:
            for _ in range(self.epochs):
                order = torch.randperm(len(y), generator=generator)
                for lo in range(0, len(y), self.batch_size):
                    rows = order[lo : lo + self.batch_size]
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        self.net(inputs[rows]).squeeze(1), targets[rows], weight=weights[rows], pos_weight=pos_weight
                    )
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            torch.set_num_threads(threads)
        self.net.eval()
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(yes) of each row (a 1-D array, not sklearn's two columns)."""
        import torch

        if self.net is None:
            raise RuntimeError("TinyMLP is not fitted: call fit() or load() first.")
        with torch.no_grad():
            logits = self.net(torch.from_numpy((X - self.mean_) / self.scale_).float()).squeeze(1)
        return torch.sigmoid(logits).double().numpy()

    def tensors(self) -> dict:
        import torch

        out = {f"net.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}
        out["mean"] = torch.from_numpy(self.mean_.copy())
        out["scale"] = torch.from_numpy(self.scale_.copy())
        return out

    def load_tensors(self, tensors: dict) -> "TinyMLP":
        self.mean_ = tensors["mean"].numpy()
        self.scale_ = tensors["scale"].numpy()
        self.net = self._build(len(self.mean_))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net.eval()
        return self
