"""SLIM: semantically-consistent, distributional intervention policies for language models.

One module per concern, in pipeline order:
    config        typed settings of every stage (checked once) and ParameterError
    layout        every output path of a run (RunLayout)
    data          TruthfulQA loading (file, cache or checked download), probe texts, folds
    models        model registry and loading (hub ids, local folders, the offline SmolLM2 default)
    heads         the head-activation context manager and the attention-output layout of any decoder
    activations   batched last-token extraction with an on-disk cache; probe data
    probes        risk-aware head probes trained all at once, the layer detector
    stage1        per-fold probes, the per-layer metrics and the edited layer
    gaussian_ot   the exact head-wise chance-constrained SDP and the Gaussian OT map
    interventions SLIM, ITI and MiMiC-style policies (attach, save, load)
    linear_act    the Linear-AcT baseline: per-dimension affine OT maps, fitted and applied
    mixed         the paper's Table 2 arms: SLIM's intervention on ITI's heads, ITI's on SLIM's layer
    fit           fitting the policies from a fold's activations
    prefix        the shared prompt's key/value cache, computed once and reused by every batch
    generation    TruthfulQA prompting and batched greedy decoding that stops at the answer's end
    likelihood    MC1/MC2 and CE/KL from the model's log-probabilities
    judges        truth / informativeness judges, a package: base (interface, make_judge), openai, local, offline
    metrics       True*Info, SEM, degeneracy, summaries
    evaluation    answering and scoring a method on every fold, the summary files
    sweep         choosing a knob from validation summaries
    reports       figures and the comparison table (one judge per table), with bootstrap intervals
    stats         bootstrap intervals and paired differences (scipy)
    figures       Figure 2: the validation sweeps with their bands
    examples      Table 5: qualitative examples chosen by a stated rule
    timing        Table 4: the running time of the probes, the maps and the inference overhead
    transfer      the fitted policies on NQ-open (the paper's transfer experiment)
    paper         the index of reproduce.sh's artefacts and the README's generated results
    audit         labelling a sample of answers by hand, and the judges' agreement with any labels
"""

__version__ = "0.1.0"

from .activations import ProbeData, cached_head_activations, load_probe_data
from .config import DataConfig, EvalConfig, ITIConfig, ParameterError, ProbeConfig, SlimConfig
from .data import load_truthfulqa, probe_texts, questions_and_folds
from .evaluation import evaluate_method, load_scorers
from .fit import fit_iti, fit_mimic, fit_slim, iti_for_fold, slim_for_fold
from .generation import answer_closed, answer_questions, extract_answer, generate_greedy, qa_prompt, shared_prefix
from .heads import HeadLayout, HeadTrace, model_shape, set_head_layout
from .interventions import ITIPolicy, MimicPolicy, Policy, SlimPolicy, model_fingerprint
from .judges import make_judge
from .layout import RunLayout
from .likelihood import mc_scores
from .linear_act import LinearActPolicy, fit_linear_act, linear_act_for_fold
from .mixed import ITIOnSlimLayerPolicy, SlimOnITIHeadsPolicy, iti_on_slim_layer_for_fold, slim_on_iti_heads_for_fold
from .models import LoadedModel, load_model
from .prefix import PrefixCache
from .probes import RiskAwareProbes
from .stage1 import chosen_layers, fit_stage1, layer_table

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
