"""SLIM: semantically-consistent, distributional intervention policies for language models.

One module per concern:
    data          TruthfulQA loading (file, cache or checked download), probe texts, fold splits
    models        model registry and loading (hub ids, local folders, the offline SmolLM2 default)
    heads         the head-activation context manager (read / edit the attention-output input)
    activations   batched last-token extraction with an on-disk cache
    probes        risk-aware head probes trained all at once, the layer detector
    gaussian_ot   the exact head-wise chance-constrained SDP and the Gaussian OT map
    interventions SLIM, ITI and MiMiC-style policies
    generation    TruthfulQA prompting and batched greedy decoding
    judges        truth / informativeness judges (OpenAI API, local LM, offline)
    metrics       True*Info, SEM, MC1/MC2, CE/KL, degeneracy
"""

__version__ = "0.1.0"
