"""The pipeline's settings chosen per model, by a stated rule, and the command the shell scripts ask.

    python -m slim.models.defaults num_heads gemma3_270M               # 6
    python -m slim.models.defaults num_heads gemma3_270M --with_rule   # 6 smollm2_share

Only ITI's K (the heads it shifts) depends on the model. The grids of kappa, alpha and lambda are the same for
every model: they are in units that do not depend on it (kappa weighs the detectors' probabilities, alpha is in
units of each head's own standard deviation along its direction, lambda is the fraction of Linear-AcT's
transport), and each model's value is chosen on its own validation questions. Batch sizes stay as they are (the
answering batch is capped from free GPU memory already).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_K = 48  # ITI's published K: 48 of LLaMA-7B's 32 x 32 = 1,024 heads
SMOLLM2_K, SMOLLM2_HEADS = 24, 30 * 9  # the K this project fitted to SmolLM2-135M, of its 270 heads
# the paper's models keep the published K
PAPER_MODELS = (
    "llama_7B",
    "alpaca_7B",
    "vicuna_7B",
    "llama2_chat_7B",
    "llama2_chat_13B",
    "llama2_chat_70B",
    "llama3_8B",
    "llama3_instruct_8B",
)
# the project's small offline models: layers x heads per layer (known without loading or converting them)
SMALL_MODELS = {"smollm2_135M": 30 * 9, "gemma3_270M": 18 * 4}
RULES = {
    "paper_48": f"the paper's model keeps the published K = {PAPER_K} (of 1,024 heads on LLaMA-7B)",
    "smollm2_share": f"SmolLM2's share, {SMOLLM2_K} of its {SMOLLM2_HEADS} heads, of this model's heads, rounded, "
    "at least 1",
    "fallback_48": f"the published K = {PAPER_K}: this model's head count could not be read from its config",
}


@dataclass(frozen=True)
class NumHeads:
    """ITI's K for a model: `k`, the name of the rule that chose it (a key of RULES), the model's head count
    where it was known, and a one-line `note` when the rule fell back."""

    k: int
    rule: str
    total_heads: int | None = None
    note: str | None = None


def smollm2_share(total_heads: int) -> int:
    """SmolLM2's share of heads (24 of 270, about 8.9 %) of `total_heads`, rounded half up, at least 1."""
    return max(1, math.floor(total_heads * SMOLLM2_K / SMOLLM2_HEADS + 0.5))


def config_heads(source: str) -> int:
    """layers x attention heads per layer from the config of `source` (a folder or hub id); no weights read.
    Raises OSError / ValueError / AttributeError when it cannot be read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    config = getattr(config, "text_config", None) or config  # multimodal configs (Gemma 3 4B+) nest the LM's
    return int(config.num_hidden_layers) * int(config.num_attention_heads)


def iti_num_heads(model: str, model_dir: str | None = None) -> NumHeads:
    """ITI's K (--num_heads) for `model` (a registry key, hub id or folder), by one rule:

    - the paper's models (their registry keys or hub ids) keep the published 48 (of 1,024 heads): `paper_48`;
    - any other model takes the share of its heads that this project fitted to SmolLM2-135M, 24 of 270
      (about 8.9 %), rounded, at least 1: SmolLM2 24, Gemma 3 270M (18 x 4 = 72 heads) 6: `smollm2_share`.
      The project's small models' head counts are known; another model's are read from its config (from
      `model_dir` when given, else from `model`) without loading its weights;
    - when that config cannot be read: 48, with a one-line note: `fallback_48`.

    Only K follows the model: the kappa / alpha / lambda grids are in model-free units (see the module's
    docstring) and stay the same for every model.
    """
    if model in PAPER_MODELS or _paper_hub_id(model):
        return NumHeads(PAPER_K, "paper_48")
    if model in SMALL_MODELS:
        return NumHeads(smollm2_share(SMALL_MODELS[model]), "smollm2_share", SMALL_MODELS[model])
    source = model_dir or model
    try:
        total = config_heads(source)
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as err:
        first = " ".join(str(err).split())[:120]
        note = (
            f"ITI's K for {source!r}: its config could not be read ({type(err).__name__}: {first}), so K = "
            f"{PAPER_K}, the published value; set NUM_HEADS (or --num_heads) to choose it."
        )
        return NumHeads(PAPER_K, "fallback_48", None, note)
    return NumHeads(smollm2_share(total), "smollm2_share", total)


def _paper_hub_id(model: str) -> bool:
    """Whether `model` is the hub id the registry names for one of the paper's models."""
    from .loading import MODEL_REGISTRY

    return any(MODEL_REGISTRY.get(key) == model for key in PAPER_MODELS)


def main(argv=None) -> NumHeads:
    """`num_heads MODEL [--model_dir DIR] [--with_rule]`: print K (with the rule's name), notes on stderr.
    Arguments it does not know (the other flags a shell script passes on) are ignored."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="A pipeline default chosen per model.", allow_abbrev=False)
    parser.add_argument("setting", choices=("num_heads",), help="num_heads: ITI's K")
    parser.add_argument("model", help="registry key, hub id or folder")
    parser.add_argument("--model_dir", default=None, help="the folder the model is loaded from, if any")
    parser.add_argument("--with_rule", action="store_true", help="print `K rule` (the rule's name, RULES)")
    args, _ = parser.parse_known_args(argv)
    chosen = iti_num_heads(args.model, args.model_dir)
    if chosen.note:
        print(f"note: {chosen.note}", file=sys.stderr)
    print(f"{chosen.k} {chosen.rule}" if args.with_rule else chosen.k)
    return chosen


if __name__ == "__main__":
    main()
