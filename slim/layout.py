"""Every file a run writes, named in one place.

A run is a model (tag) on a set of questions under one output folder. A
question subset (`n_questions`) is part of the run's tag, `<model>_first<N>`,
so its files never mix with the full-data ones; scoring only the first N
questions of each split (`max_questions`) marks the answers and summaries with
`_max<N>`.

    out_dir/
        splits/fold_<k>_<split>_seed_<seed>.csv
        features/<tag>_<dataset>_head_wise.npy|json      activation cache
        probes/<tag>/fold<k>_<dataset>_<probe>.safetensors
        <tag>_layer_metrics_<probe>.csv, <tag>_chosen_layer_<probe>.json
        figures/figure1a_<tag>_..., figure1b_<tag>_...   (unless a paper folder is named)
        maps/<tag>/fold<k>_layer<l>_gamma<g>_<cov>_min<m>_<probe>.safetensors
        policies/<tag>/slim_fold<k>_..., iti_fold<k>_...
        answers/<tag>/<run name>_fold<k>_<split>[_max<N>].csv
        summary/<tag>_<run name>_<split>[_max<N>][_fold<k>only].csv|json|config.json
        <tag>_best_<method>.json                          the sweep's choice

Each computed artefact is written under its own lock, `.<name>.lock` beside it
(slim.io.artefact_lock): runs on one out_dir go on at once and wait only for
an artefact another run is writing, which they then read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ProbeConfig, SlimConfig, fmt

__all__ = ["RunLayout", "model_tag", "method_name"]


def model_tag(model_name: str, model_dir: str | None = None) -> str:
    """A file-name-safe name for the model: the folder's name, or the key / hub id with `/` as `_`."""
    if model_dir:
        return Path(model_dir.rstrip("/")).name
    return model_name.replace("/", "_")


def method_name(method: str, params: dict) -> str:
    """`slim_kappa40_gamma0.1_psiidentity_bl1`: the method and its knobs, as in file names."""
    tag = "_".join(f"{k}{fmt(v) if isinstance(v, float) else v}" for k, v in params.items())
    return f"{method}_{tag}" if tag else method


@dataclass(frozen=True)
class RunLayout:
    """Every output path of a run under `out_dir`: fold splits, activation caches, probes, maps, policies,
    answers, summaries and figures, each named by the model tag, the question subset and the settings."""

    out_dir: Path
    model: str  # model tag
    n_questions: int | None = None  # question subset
    figure_dir: Path | None = None  # where figures go (default out_dir/figures)

    def __post_init__(self):
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    @property
    def tag(self) -> str:
        return f"{self.model}_first{self.n_questions}" if self.n_questions else self.model

    # data and stage 1
    @property
    def splits_dir(self) -> Path:
        return self.out_dir / "splits"

    def features(self, dataset: str) -> Path:
        """The activation cache of a probe dataset (.npy; its manifest is the .json beside it)."""
        return self.out_dir / "features" / f"{self.tag}_{dataset}_head_wise.npy"

    def probes(self, fold: int, dataset: str, cfg: ProbeConfig) -> Path:
        return self.out_dir / "probes" / self.tag / f"fold{fold}_{dataset}_{cfg.tag()}.safetensors"

    def layer_metrics(self, cfg: ProbeConfig) -> Path:
        return self.out_dir / f"{self.tag}_layer_metrics_{cfg.tag()}.csv"

    def bl_sweep_metrics(self) -> Path:
        return self.out_dir / f"{self.tag}_layer_metrics_bl_sweep.csv"

    def chosen_layer(self, cfg: ProbeConfig) -> Path:
        return self.out_dir / f"{self.tag}_chosen_layer_{cfg.tag()}.json"

    def figure(self, name: str, what: str) -> Path:
        return (self.figure_dir or self.out_dir / "figures") / f"{name}_{self.tag}_{what}.png"

    # policies
    def maps(self, fold: int, layer: int, slim: SlimConfig, probe: ProbeConfig) -> Path:
        return (
            self.out_dir
            / "maps"
            / self.tag
            / f"fold{fold}_layer{layer}_gamma{fmt(slim.gamma)}_{slim.cov}_min{slim.min_samples}_{probe.tag()}"
            ".safetensors"
        )

    def slim_policy(self, fold: int, layer: int, slim: SlimConfig, probe: ProbeConfig | None = None) -> Path:
        # probes trained by another loss than the paper's (Table 3) keep their own folder
        loss = f"_{probe.loss_type}" if probe is not None and probe.loss_type != "risk" else ""
        return (
            self.out_dir
            / "policies"
            / self.tag
            / f"slim_fold{fold}_layer{layer}_gamma{fmt(slim.gamma)}_kappa{fmt(slim.kappa)}_{slim.psi}{loss}"
        )

    def iti_policy(self, fold: int, direction: str, num_heads: int, tuning_dataset: str) -> Path:
        return self.out_dir / "policies" / self.tag / f"iti_fold{fold}_{direction}_heads{num_heads}_{tuning_dataset}"

    # evaluation
    @staticmethod
    def _max(max_questions: int | None) -> str:
        return f"_max{max_questions}" if max_questions else ""

    def answers(self, name: str, fold: int, split: str, max_questions: int | None = None) -> Path:
        return self.out_dir / "answers" / self.tag / f"{name}_fold{fold}_{split}{self._max(max_questions)}.csv"

    def summary_stem(self, name: str, split: str, max_questions: int | None = None, fold: int | None = None) -> Path:
        only = f"_fold{fold}only" if fold is not None else ""
        # names carry numbers such as gamma0.1, so extensions are appended to the stem, never swapped in
        return self.out_dir / "summary" / f"{self.tag}_{name}_{split}{self._max(max_questions)}{only}"

    def best(self, method: str) -> Path:
        return self.out_dir / f"{self.tag}_best_{method}.json"
