"""SLIM: semantically-consistent, distributional intervention policies for language models.

The package is laid out by pipeline stage; each subpackage's docstring lists its modules:
    config, layout, io  settings of every stage (ParameterError), every output path of a run, durable files
    data                TruthfulQA, probe texts, folds, and the head activations extracted from them
    models              the model registry and loading; HeadTrace, the head-wise view of any decoder
    stage1              risk-aware head probes, the layer detector, the edited layer
    policies            SLIM, ITI, MiMiC-style, Linear-AcT and the mixed arms: fitting, attaching, saving
    answering           prompts, the shared prompt's cache, greedy decoding, answer files, MC1/MC2 and CE/KL
    judges              truth / informativeness judges (offline, local:, openai:), the judge card, the audit
    evaluation          metrics, scoring a method on every fold, statistics, the knob sweep, the table
    paper               the paper's figures and tables, Table 4's timings, transfer, the reproduction's index

The public API is `__all__` below; old module paths (slim.policies, slim.answering, ...) still import
(see slim._moved).
"""

from . import _moved  # noqa: F401  (old module paths: installed before anything else imports)
from ._lazy import lazy_exports

# where each public name lives; imported on first use (PEP 562), so that `python -m slim.<module>` and the
# scripts load only what they use (the eager imports of every stage cost seconds per process)
_LAZY = {
    "answer_questions": "answering.answers",
    "generate_greedy": "answering.decoding",
    "mc_scores": "answering.likelihood",
    "PrefixCache": "answering.prefix",
    "answer_closed": "answering.prompts",
    "extract_answer": "answering.prompts",
    "qa_prompt": "answering.prompts",
    "shared_prefix": "answering.prompts",
    "DataConfig": "config",
    "EvalConfig": "config",
    "ITIConfig": "config",
    "ParameterError": "config",
    "ProbeConfig": "config",
    "SlimConfig": "config",
    "__version__": "config",
    "ProbeData": "data.activations",
    "cached_head_activations": "data.activations",
    "load_probe_data": "data.activations",
    "questions_and_folds": "data.folds",
    "probe_texts": "data.probe_texts",
    "load_truthfulqa": "data.truthfulqa",
    "evaluate_method": "evaluation.evaluate",
    "load_scorers": "evaluation.evaluate",
    "make_judge": "judges",
    "RunLayout": "layout",
    "HeadLayout": "models.heads",
    "HeadTrace": "models.heads",
    "model_shape": "models.heads",
    "set_head_layout": "models.heads",
    "LoadedModel": "models.loading",
    "load_model": "models.loading",
    "Policy": "policies.base",
    "model_fingerprint": "policies.base",
    "fit_iti": "policies.fit",
    "fit_mimic": "policies.fit",
    "fit_slim": "policies.fit",
    "iti_for_fold": "policies.fit",
    "slim_for_fold": "policies.fit",
    "ITIPolicy": "policies.iti",
    "LinearActPolicy": "policies.linear_act",
    "fit_linear_act": "policies.linear_act",
    "linear_act_for_fold": "policies.linear_act",
    "MimicPolicy": "policies.mimic",
    "ITIOnSlimLayerPolicy": "policies.mixed",
    "SlimOnITIHeadsPolicy": "policies.mixed",
    "iti_on_slim_layer_for_fold": "policies.mixed",
    "slim_on_iti_heads_for_fold": "policies.mixed",
    "SlimPolicy": "policies.slim",
    "chosen_layers": "stage1.fit",
    "fit_stage1": "stage1.fit",
    "layer_table": "stage1.fit",
    "RiskAwareProbes": "stage1.probes",
}

__all__ = [
    # settings and files
    "DataConfig",
    "ProbeConfig",
    "SlimConfig",
    "ITIConfig",
    "EvalConfig",
    "ParameterError",
    "RunLayout",
    # data and models
    "load_truthfulqa",
    "questions_and_folds",
    "probe_texts",
    "load_model",
    "LoadedModel",
    # head-wise access and activations
    "HeadTrace",
    "HeadLayout",
    "set_head_layout",
    "model_shape",
    "cached_head_activations",
    "load_probe_data",
    "ProbeData",
    # stage 1
    "RiskAwareProbes",
    "fit_stage1",
    "chosen_layers",
    "layer_table",
    # policies
    "Policy",
    "SlimPolicy",
    "ITIPolicy",
    "MimicPolicy",
    "LinearActPolicy",
    "SlimOnITIHeadsPolicy",
    "ITIOnSlimLayerPolicy",
    "model_fingerprint",
    "fit_slim",
    "fit_iti",
    "fit_mimic",
    "slim_for_fold",
    "iti_for_fold",
    "fit_linear_act",
    "linear_act_for_fold",
    "slim_on_iti_heads_for_fold",
    "iti_on_slim_layer_for_fold",
    # answering and scoring
    "qa_prompt",
    "shared_prefix",
    "PrefixCache",
    "generate_greedy",
    "answer_questions",
    "answer_closed",
    "extract_answer",
    "mc_scores",
    "make_judge",
    "load_scorers",
    "evaluate_method",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
