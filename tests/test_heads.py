"""The head-activation context manager on tiny random Llama, GPT-2 and GPT-NeoX models."""

import math

import pytest
import torch

from conftest import tiny_model
from slim.heads import HeadTrace, attention_output_projections, head_shape, left_padded_positions

IDS = torch.tensor([[5, 9, 12, 7, 30, 3, 17, 22], [4, 4, 8, 15, 16, 23, 42, 11]])


def _attention_module(model, layer):
    """The attention block whose output the projection produces, per architecture."""
    blocks, name = {"llama": (lambda: model.model.layers, "self_attn"),
                    "gpt2": (lambda: model.transformer.h, "attn"),
                    "gpt_neox": (lambda: model.gpt_neox.layers, "attention")}[model.config.model_type]
    return getattr(blocks()[layer], name)


def test_recorded_input_reproduces_the_attention_output(arch_model):
    """proj(recorded) equals what the attention module itself returned (captured by a plain forward hook)."""
    _, model = arch_model
    layer = 1
    captured = {}
    attn = _attention_module(model, layer)
    handle = attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out[0]))
    try:
        with HeadTrace(model, layers=[layer], record="all") as trace:
            model(IDS)
    finally:
        handle.remove()
    acts = trace.activations[layer]  # (batch, seq, heads, head_dim)
    heads, head_dim = head_shape(model)
    assert acts.shape == (2, IDS.shape[1], heads, head_dim)
    proj = attention_output_projections(model)[layer]
    torch.testing.assert_close(proj(acts.reshape(2, IDS.shape[1], -1)), captured["out"], atol=1e-5, rtol=1e-5)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def test_llama_layer0_matches_a_hand_written_attention():
    """Layer 0's o_proj input computed from scratch: RMSNorm, q/k/v, RoPE, GQA causal softmax attention."""
    model = tiny_model("llama")
    cfg = model.config
    heads, d = head_shape(model)
    kv_heads = cfg.num_key_value_heads
    with HeadTrace(model, layers=[0], record="all") as trace:
        model(IDS)
    blk = model.model.layers[0]
    x = model.model.embed_tokens(IDS)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * blk.input_layernorm.weight
    b, s, _ = x.shape
    q = (x @ blk.self_attn.q_proj.weight.T).view(b, s, heads, d)
    k = (x @ blk.self_attn.k_proj.weight.T).view(b, s, kv_heads, d)
    v = (x @ blk.self_attn.v_proj.weight.T).view(b, s, kv_heads, d)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.arange(s, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # (seq, d)
    q = q * cos[None, :, None] + _rotate_half(q) * sin[None, :, None]
    k = k * cos[None, :, None] + _rotate_half(k) * sin[None, :, None]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)  # (batch, seq, heads, head_dim)
    torch.testing.assert_close(trace.activations[0], expected, atol=1e-5, rtol=1e-4)


def test_editing_one_head_changes_logits_as_predicted(arch_model):
    """Adding delta to head h equals adding W_o[:, h] @ delta to the projection output, nothing else moves."""
    _, model = arch_model
    layer, head = 1, 2
    heads, d = head_shape(model)
    delta = torch.randn(d, generator=torch.Generator().manual_seed(1))
    proj = attention_output_projections(model)[layer]
    baseline_logits = model(IDS).logits

    def edit(l, acts):  # acts: (batch, seq, heads, head_dim)
        acts[:, -1, head] += delta

    seen = {}
    # Registered after HeadTrace's hook, so it sees the edited input the projection really uses.
    with HeadTrace(model, layers=[layer], edit=edit, record="all") as trace:
        handle = proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
        edited_logits = model(IDS).logits
        handle.remove()
    used = seen["x"].view(2, IDS.shape[1], heads, d)
    before = trace.activations[layer]
    torch.testing.assert_close(used[:, -1, head], before[:, -1, head] + delta)
    other = [h for h in range(heads) if h != head]
    assert torch.equal(used[:, :, other], before[:, :, other])
    assert torch.equal(used[:, :-1], before[:, :-1])

    # Independent route: add the head's share of the projection to the projection output.
    weight = proj.weight if model.config.model_type != "gpt2" else proj.weight.T  # (out, in)
    shift = weight[:, head * d:(head + 1) * d] @ delta

    def add_shift(module, args, out):
        out = out.clone()
        out[:, -1] += shift
        return out

    handle = proj.register_forward_hook(add_shift)
    try:
        expected_logits = model(IDS).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited_logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited_logits[:, -1], baseline_logits[:, -1])
    torch.testing.assert_close(edited_logits[:, :-1], baseline_logits[:, :-1], atol=1e-6, rtol=1e-6)


def test_model_is_unchanged_after_exit(arch_model):
    _, model = arch_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(IDS).logits

    def scramble(l, acts):
        acts.mul_(-3.0)

    with HeadTrace(model, edit=scramble, record="last"):
        changed = model(IDS).logits
    assert not torch.allclose(changed, before)
    assert all(not p._forward_pre_hooks for p in attention_output_projections(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


def test_hooks_are_removed_when_the_forward_raises():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with HeadTrace(model, edit=lambda l, a: (_ for _ in ()).throw(RuntimeError("boom"))):
            model(IDS)
    assert all(not p._forward_pre_hooks for p in attention_output_projections(model))


def test_errors_are_one_line():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        HeadTrace(model, layers=[7])
    model.config.model_type = "mamba"
    with pytest.raises(ValueError, match="not supported"):
        attention_output_projections(model)


def test_left_padded_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert left_padded_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
