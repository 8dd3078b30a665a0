"""Typed settings of every stage, checked once, in the library's own terms.

Each dataclass validates itself on construction, so a bad value fails before
any model or data is touched, with a one-line `ParameterError` that names the
parameter (`gamma`, `kappa`, ...). The command-line scripts map parameter names
to their flags (`gamma` is `--alpha` in the published `ot_edit_layer.py`).
`run_config(...)` gathers the settings of a run into one JSON-able dict, saved
beside every summary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

__version__ = "0.1.0"  # recorded in the caches a run writes

__all__ = ["ParameterError", "DataConfig", "ProbeConfig", "SlimConfig", "ITIConfig", "EvalConfig", "run_config", "fmt"]

# probe-training texts; tqa_mc2_plain: tqa_mc2 without the closing period (this project's earlier texts, an ablation)
DATASETS = ("tqa_mc2", "tqa_gen_end_q", "tqa_mc2_plain")
# order of the questions before the folds are cut: auto (mc when mc_task.json is at hand, else shuffle),
# mc (the multiple-choice release's, as the published scripts), shuffle (seeded), csv (file order)
QUESTION_ORDERS = ("auto", "mc", "shuffle", "csv")
LOSS_TYPES = ("risk", "cross_entropy", "l2")
LAYER_CRITERIA = ("val_loss", "fnr", "fpr", "1-acc", "1-f1")
PSI = ("identity", "softmax")
COVARIANCES = ("empirical", "ledoit_wolf", "ridge")
# a head flagging fewer activations than this keeps the identity map, unless min_samples says otherwise:
# empirical follows the published code (no minimum beyond the 2 rows any covariance needs)
MIN_SAMPLES = {"empirical": 2, "ledoit_wolf": 10, "ridge": 10}
PROBE_CHECKPOINTS = ("last", "best")  # which epoch's probe parameters are kept (slim.stage1.probes)
DIRECTIONS = ("com", "probe", "random")
# activations whose projections on ITI's directions give sigma: tqa_gen_end_q texts of all the run's
# questions (the published default), of the fold's train+val questions only, or the probe texts' train+val rows
TUNING_DATASETS = ("tqa_gen_end_q_all", "tqa_gen_end_q", "same")
ITI_SOLVERS = ("sklearn", "torch")  # ITI's per-head probes: scikit-learn one by one (published), or one torch fit
SPLITS = ("test", "val")
ANSWER_RULES = ("published", "paragraph")  # how an answer is cut out of a continuation (slim.answering)
LIKELIHOOD_EDITS = ("every", "last")  # where MC1/MC2 and CE/KL are edited (slim.answering.likelihood)


class ParameterError(ValueError):
    """A bad setting: `param` names it, the message says what it must be."""

    def __init__(self, param: str, requirement: str):
        self.param, self.requirement = param, requirement
        super().__init__(f"{param} {requirement}")


def fmt(x: float) -> str:
    """Numbers in file names and tags: 1.0 -> 1, 0.1 -> 0.1."""
    return f"{x:g}"


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def check_nonneg(param: str, value) -> float:
    if not (_finite(value) and float(value) >= 0):
        raise ParameterError(param, f"must be a finite number >= 0, got {value}.")
    return float(value)


def check_int(param: str, value, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not _finite(value)
        or int(value) != float(value)
        or int(value) < low
        or (high is not None and int(value) > high)
    ):
        span = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise ParameterError(param, f"must be {span}, got {value}.")
    return int(value)


def check_choice(param: str, value, choices) -> str:
    if value not in choices:
        raise ParameterError(param, f"must be one of {', '.join(choices)}, got {value!r}.")
    return value


def check_gamma(gamma) -> float:
    if not (_finite(gamma) and 0.0 < float(gamma) < 0.5):
        raise ParameterError("gamma", f"must lie in (0, 0.5), got {gamma}.")
    return float(gamma)


def check_kappa(kappa) -> float:
    return check_nonneg("kappa", kappa)


def check_alpha(alpha) -> float:
    if not _finite(alpha):
        raise ParameterError("alpha", f"must be finite, got {alpha}.")
    return float(alpha)


@dataclass(frozen=True)
class DataConfig:
    """Which questions, and how they are split into folds."""

    tqa_dir: str | None = None  # folder of TruthfulQA.csv (else SLIM_TQA_DIR, cache, download)
    n_questions: int | None = None  # the first N questions only (quick runs)
    num_fold: int = 2
    val_ratio: float = 0.2
    seed: int = 42  # fold split seed
    dataset_name: str = "tqa_mc2"  # probe-training texts
    question_order: str = "auto"  # QUESTION_ORDERS; the scripts record the one used (slim.data.resolve_question_order)

    def __post_init__(self):
        check_int("num_fold", self.num_fold, 2)
        if not (_finite(self.val_ratio) and 0 < self.val_ratio < 1):
            raise ParameterError("val_ratio", f"must lie in (0, 1), got {self.val_ratio}.")
        check_choice("dataset_name", self.dataset_name, DATASETS)
        check_choice("question_order", self.question_order, QUESTION_ORDERS)
        if self.n_questions is not None:
            check_int("n_questions", self.n_questions, 2 * self.num_fold)


@dataclass(frozen=True)
class ProbeConfig:
    """Stage 1: the head probes' training (paper eq. 2); `bl` is the paper's alpha (FNR weight)."""

    loss_type: str = "risk"
    bl: float = 1.0
    beta: float = 0.0
    epochs: int = 1000
    lr: float = 2e-3
    seed: int = 0
    # "last": the weights after the last epoch, what the published code keeps (its saved best state is the
    # live state_dict, which Adam keeps updating); "best": the best-validation epoch, as the paper says
    checkpoint: str = "last"

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("checkpoint", self.checkpoint, PROBE_CHECKPOINTS)
        check_nonneg("bl", self.bl)
        check_nonneg("beta", self.beta)
        check_int("epochs", self.epochs, 1)
        if not (_finite(self.lr) and self.lr > 0):
            raise ParameterError("lr", f"must be a finite number > 0, got {self.lr}.")

    def tag(self) -> str:
        """Names the probe files, layer tables and maps: probes of another checkpoint are never reused."""
        return (
            f"{self.loss_type}_bl{fmt(self.bl)}_beta{fmt(self.beta)}_ep{self.epochs}_lr{fmt(self.lr)}_seed{self.seed}"
            f"_ckpt{self.checkpoint}"
        )

    def with_bl(self, bl: float) -> "ProbeConfig":
        return replace(self, bl=bl)


@dataclass(frozen=True)
class SlimConfig:
    """Stages 2-3: the head-wise maps of the chosen layer and their aggregation."""

    gamma: float = 0.1  # chance constraint's tolerance (the published scripts' --alpha)
    kappa: float = 40.0  # aggregation strength: the one tuned knob
    psi: str = "identity"
    # the flagged activations' covariance: empirical (published: maximum likelihood, jittered only when not
    # positive definite), ledoit_wolf (shrunk) or ridge
    cov: str = "empirical"
    min_samples: int | None = None  # a head flagging fewer activations keeps the identity map; None: MIN_SAMPLES[cov]
    criterion: str = "val_loss"  # how stage 1's per-layer metrics choose the edited layer

    def __post_init__(self):
        check_gamma(self.gamma)
        check_kappa(self.kappa)
        check_choice("psi", self.psi, PSI)
        check_choice("cov", self.cov, COVARIANCES)
        if self.min_samples is None:
            object.__setattr__(self, "min_samples", MIN_SAMPLES[self.cov])  # frozen: set once, here
        check_int("min_samples", self.min_samples, 0)
        check_choice("criterion", self.criterion, LAYER_CRITERIA)


@dataclass(frozen=True)
class ITIConfig:
    """ITI (Li et al., 2023): K heads shifted by alpha * sigma * direction; alpha 0 = unintervened."""

    num_heads: int = 48
    alpha: float = 15.0
    direction: str = "probe"  # com (class-mean difference), probe (its weight) or random
    tuning_dataset: str = "tqa_gen_end_q_all"  # activations whose projections give sigma (TUNING_DATASETS)

    def __post_init__(self):
        check_int("num_heads", self.num_heads, 1)
        check_alpha(self.alpha)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("tuning_dataset", self.tuning_dataset, TUNING_DATASETS)


@dataclass(frozen=True)
class EvalConfig:
    """Answering and scoring: the same for every method, so the comparison is fair."""

    use_mode: str = "test"  # score the folds' test questions, or their validation questions
    judge_name: str = "offline"
    info_name: str = "offline"
    embedder: str = "all-MiniLM-L6-v2"
    max_questions: int | None = None  # only the first N questions of each fold's split
    fold: int | None = None  # only this fold
    max_new_tokens: int = 50
    batch_size: int = 64  # questions answered at once: each decoding step reads the weights once for all of them
    mc: bool = False  # the scripts turn it on for --use_mode test (slim_utils.eval_config)
    ce_kl: bool = False  # likewise
    prefix_cache: bool = True  # run the shared instruction and primer once, reuse their key/value cache
    stop_at_answer: bool = True  # end each generation once its answer is closed (same answers, fewer steps)
    # published: before the first Q:, after the first A: (the published code); paragraph: first paragraph after A:
    answer_rule: str = "published"
    # every: MC edited from the answer's first token, CE/KL from position 0 (the published code); last: only the
    # last position of each forward pass, which no scored log-prob sees
    likelihood_edit: str = "every"

    def __post_init__(self):
        check_choice("use_mode", self.use_mode, SPLITS)
        check_choice("answer_rule", self.answer_rule, ANSWER_RULES)
        check_choice("likelihood_edit", self.likelihood_edit, LIKELIHOOD_EDITS)
        if self.max_questions is not None:
            check_int("max_questions", self.max_questions, 1)
        if self.fold is not None:
            check_int("fold", self.fold, 0)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("batch_size", self.batch_size, 1)


def run_config(**parts) -> dict:
    """One JSON-able record of a run: dataclasses as dicts, other values as given."""
    return {name: asdict(part) if hasattr(part, "__dataclass_fields__") else part for name, part in parts.items()}
