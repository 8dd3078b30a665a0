"""The stages as functions of (arguments, fold), shared by the top-level scripts.

Stage 1 trains the head probes of every layer and picks the edited layer;
stage 2 fits the head-wise OT maps of that layer; every method (unintervened,
ITI, SLIM, MiMiC) is then scored by the one `evaluate` below, so the
comparison is fair: same questions, prompt, decoding, judges and metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .activations import texts_digest
from .io import write_csv
from .probes import RiskAwareProbes, choose_layer, evaluate_layers, load_probes, save_probes


def fmt(x: float) -> str:
    """Numbers in file names: 1.0 -> 1, 0.1 -> 0.1."""
    return f"{x:g}"


# ---------------------------------------------------------------------------------------------
# stage 1


@dataclass(frozen=True)
class ProbeConfig:
    loss_type: str = "risk"
    bl: float = 1.0
    beta: float = 0.0
    epochs: int = 1000
    lr: float = 2e-3
    seed: int = 0

    def tag(self) -> str:
        return (f"{self.loss_type}_bl{fmt(self.bl)}_beta{fmt(self.beta)}_ep{self.epochs}_lr{fmt(self.lr)}"
                f"_seed{self.seed}")

    def check(self) -> None:
        # the estimator checks again; failing here means before any model or data is touched
        RiskAwareProbes(self.loss_type, self.bl, self.beta, self.epochs, self.lr, self.seed)._check_params()


@dataclass
class FoldProbes:
    weight: np.ndarray  # (L, H, d)
    bias: np.ndarray  # (L, H)
    tau: np.ndarray  # (L,)
    layer_rows: list[dict]  # per-layer validation metrics
    path: Path


def train_fold_probes(acts: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
                      cfg: ProbeConfig, path: Path, features_id: str, device: str = "cpu") -> FoldProbes:
    """Probes of every head of every layer for one fold, reused from `path` when it matches."""
    meta_expected = {"config": asdict(cfg), "features": features_id,
                     "train_rows": texts_digest([str(r) for r in train_rows]),
                     "val_rows": texts_digest([str(r) for r in val_rows])}
    if path.exists():
        weight, bias, tau, meta = load_probes(path)
        if {k: meta.get(k) for k in meta_expected} == meta_expected:
            return FoldProbes(weight.numpy(), bias.numpy(), tau.numpy(), meta["layer_rows"], path)
    # sorted rows read the memory-mapped activations in order
    train_rows, val_rows = np.sort(train_rows), np.sort(val_rows)
    X_train = np.asarray(acts[train_rows])  # (N, L, H, d) float16
    X_val = np.asarray(acts[val_rows])
    probes = RiskAwareProbes(cfg.loss_type, cfg.bl, cfg.beta, cfg.epochs, cfg.lr, cfg.seed, device=device)
    probes.fit(X_train, labels[train_rows], X_val, labels[val_rows])
    rows = evaluate_layers(probes, X_val, labels[val_rows], bl=cfg.bl)
    L, H, d = X_train.shape[1:]
    weight = np.asarray(probes.coef_, dtype=np.float32).reshape(L, H, d)
    bias = np.asarray(probes.intercept_, dtype=np.float32).reshape(L, H)
    tau = np.array([r["tau"] for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_probes(path, weight, bias, tau, meta={**meta_expected, "layer_rows": rows,
                                               "best_epoch": np.asarray(probes.best_epoch_).tolist()})
    return FoldProbes(weight, bias, tau, rows, path)


def layer_table(fold_probes: dict[int, FoldProbes], cfg: ProbeConfig) -> pd.DataFrame:
    rows = []
    for fold, fp in fold_probes.items():
        for r in fp.layer_rows:
            rows.append({"fold": fold, "loss_type": cfg.loss_type, "bl": cfg.bl, "beta": cfg.beta, **r})
    cols = ["fold", "layer", "loss_type", "bl", "beta", "acc", "f1", "tp", "tn", "fp", "fn", "fpr", "fnr", "tau",
            "val_loss"]
    return pd.DataFrame(rows)[cols]


def chosen_layers(fold_probes: dict[int, FoldProbes], criterion: str = "val_loss") -> dict[int, int]:
    return {fold: choose_layer(fp.layer_rows, criterion) for fold, fp in fold_probes.items()}


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Scorers:
    """Judges and embedder shared by every method of a run."""
    truth_judge: object
    info_judge: object
    embedder: object
    judge_names: tuple[str, str]
    embedder_name: str


def load_scorers(judge_name: str, info_name: str, embedder_name: str, tqa_dir=None, device="cpu") -> Scorers:
    from .judges import make_judge
    from .metrics import load_embedder

    truth = make_judge(judge_name, "truth", tqa_dir=tqa_dir, device=device)
    info = make_judge(info_name, "info", tqa_dir=tqa_dir, device=device)
    return Scorers(truth, info, load_embedder(embedder_name), (judge_name, info_name), embedder_name)


def evaluate(lm, questions: pd.DataFrame, edit, method: str, params: dict, fold: int, split: str,
             answers_csv: Path, scorers: Scorers, batch_size: int = 16, max_new_tokens: int = 50,
             mc: bool = False, ce_kl: bool = False, tqa_dir=None) -> dict:
    """Answer `questions` with `edit` active, then score the answers: one summary row."""
    from .generation import answer_questions
    from .metrics import degeneracy_rate, mc_scores, sem_scores, summary_row, true_info

    answers = answer_questions(lm.model, lm.tokenizer, questions, answers_csv, edit=edit,
                               batch_size=batch_size, max_new_tokens=max_new_tokens)
    by_idx = questions.set_index("question_idx")
    qs = answers["question"].tolist()
    ans = answers["answer"].tolist()
    truth = scorers.truth_judge.score(qs, ans)
    info = scorers.info_judge.score(qs, ans)
    refs = by_idx.loc[answers["question_idx"]]
    _, sem = sem_scores(scorers.embedder, ans, refs["Correct Answers"].tolist(), refs["Incorrect Answers"].tolist())
    answers = answers.assign(truth_score=truth, info_score=info)
    write_csv(answers, answers_csv.with_name(answers_csv.stem + "_scored.csv"))
    metrics = {**true_info(truth > 0.5, info > 0.5), "sem": sem, "degeneracy": degeneracy_rate(ans),
               "n_questions": len(answers)}
    if mc:
        metrics.update(mc_scores(lm.model, lm.tokenizer, questions, edit=edit))
    if ce_kl:  # the unintervened model gets its CE and a KL of 0
        from .metrics import ce_and_kl, load_text_corpus

        texts, corpus = load_text_corpus(tqa_dir=tqa_dir)
        result = ce_and_kl(lm.model, lm.tokenizer, texts, edit=edit)
        metrics.update(ce=float(result.ce), kl=float(result.kl), ce_kl_corpus=corpus)
    return summary_row(method, {**params, "judge": scorers.judge_names[0], "info_judge": scorers.judge_names[1],
                                "embedder": scorers.embedder_name}, fold, split, **metrics)


def fold_average(rows: list[dict]) -> dict:
    """Mean of the numeric metrics over folds (fold = 'mean'), other fields from the first row."""
    df = pd.DataFrame(rows)
    out = dict(rows[0])
    for col in df.columns:
        if col not in ("fold",) and pd.api.types.is_numeric_dtype(df[col]):
            out[col] = float(df[col].mean())
    out["fold"] = "mean"
    return out
