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
from .answering.answers import answer_questions
from .answering.decoding import generate_greedy
from .answering.likelihood import mc_scores
from .answering.prefix import PrefixCache
from .answering.prompts import answer_closed, extract_answer, qa_prompt, shared_prefix
from .config import DataConfig, EvalConfig, ITIConfig, ParameterError, ProbeConfig, SlimConfig, __version__  # noqa: F401
from .data.activations import ProbeData, cached_head_activations, load_probe_data
from .data.folds import questions_and_folds
from .data.probe_texts import probe_texts
from .data.truthfulqa import load_truthfulqa
from .evaluation.evaluate import evaluate_method, load_scorers
from .judges import make_judge
from .layout import RunLayout
from .models.heads import HeadLayout, HeadTrace, model_shape, set_head_layout
from .models.loading import LoadedModel, load_model
from .policies.base import Policy, model_fingerprint
from .policies.fit import fit_iti, fit_mimic, fit_slim, iti_for_fold, slim_for_fold
from .policies.iti import ITIPolicy
from .policies.linear_act import LinearActPolicy, fit_linear_act, linear_act_for_fold
from .policies.mimic import MimicPolicy
from .policies.mixed import (
    ITIOnSlimLayerPolicy,
    SlimOnITIHeadsPolicy,
    iti_on_slim_layer_for_fold,
    slim_on_iti_heads_for_fold,
)
from .policies.slim import SlimPolicy
from .stage1.fit import chosen_layers, fit_stage1, layer_table
from .stage1.probes import RiskAwareProbes

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
