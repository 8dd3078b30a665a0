"""Shared fixtures: tiny randomly initialised models and an offline tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TQA_DIR = Path(os.environ.get("SLIM_TQA_DIR", REPO.parent / "shared" / "data" / "truthfulqa"))
if not (TQA_DIR / "TruthfulQA.csv").exists():
    # Outside this project's machines: fetch (and checksum) the files into the user cache.
    from slim.data.truthfulqa import TQA_FILES, find_truthfulqa_file

    os.environ.pop("SLIM_TQA_DIR", None)
    TQA_DIR = [find_truthfulqa_file(name) for name in TQA_FILES][0].parent

WORDS = (
    "Q: A: What is the capital of France ? Paris . It London yes no True: Helpful: I have no comment "
    "who where when why how a an in on at to from was were be been Nothing happens you eat seeds"
).split()


def make_tokenizer():
    """A word-level fast tokenizer built in memory (no download), left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.padding_side = "left"
    return fast


def make_bpe_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained in memory on `corpus`, with a BOS token like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def tiny_model(arch: str, vocab_size: int = 64, seed: int = 0, max_positions: int = 128, num_layers: int = 3):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=num_layers,
            n_head=4,
            n_positions=max_positions,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=2,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=max_positions,
            rotary_pct=0.5,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=2,
        )
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.config.pad_token_id = 0
    return model.eval().requires_grad_(False)


@pytest.fixture(params=["llama", "gpt2", "gpt_neox"])
def arch_model(request):
    return request.param, tiny_model(request.param)


def random_policy(kind: str, model, kappa: float = 1.0, psi: str = "identity"):
    """A random SLIM policy at layer 1 (tau 0: the detector fires on every token) or ITI policy, both of which
    change what a tiny model says."""
    from slim.models.heads import model_shape
    from slim.policies.base import model_fingerprint
    from slim.policies.iti import ITIPolicy
    from slim.policies.slim import SlimPolicy

    g = torch.Generator().manual_seed(1)
    L, H, d = model_shape(model)
    fp = model_fingerprint(model)
    if kind == "slim":
        A, b = torch.eye(d) + 0.5 * torch.randn(H, d, d, generator=g), 0.5 * torch.randn(H, d, generator=g)
        weight = torch.randn(H, d, generator=g)
        return SlimPolicy(weight, torch.zeros(H), A, b, layer=1, tau=0, kappa=kappa, psi=psi, fingerprint=fp)
    return ITIPolicy([[0, 1], [1, 2]], torch.randn(2, d, generator=g), torch.full((2,), 0.1), alpha=2.0, fingerprint=fp)


class LengthJudge:
    """A stand-in judge: 'yes' for answers with more than two words."""

    name = "stub"

    def score(self, questions, answers):
        return np.array([float(len(str(a).split()) > 2) for a in answers])


class HashEmbedder:
    """A stand-in sentence embedder: a random vector seeded by the text's hash."""

    def encode(self, texts):
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts])


# ---------------------------------------------------------------------------------------------
# running the published scripts in a subprocess (tests/scripts and the method tests)


def run(args, root, env=None, check=True):
    cmd = [sys.executable, *args]
    full_env = {**os.environ, "SLIM_TQA_DIR": str(TQA_DIR), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def common(root, model_dir):
    return ["--model_dir", str(model_dir), "--device", "cpu", "--num_fold", "2", "--out_dir", str(root / "validation")]


def eval_flags(model_dir):
    return [
        "--judge_name",
        f"local:{model_dir}",
        "--info_name",
        f"local:{model_dir}",
        "--max_questions",
        "3",
        "--max_new_tokens",
        "4",
    ]
