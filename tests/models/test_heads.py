"""The head-activation context manager on tiny random models, and how it finds the attention output projection.

Llama, GPT-2 and GPT-NeoX come from conftest; OPT, Phi, Falcon, Bloom and GPT-J (layouts the old fixed table
lacked) and a hand-written decoder with an unusual layout are built here.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_model
from slim.models.heads import (
    COMMON_PROJECTIONS,
    HeadLayout,
    HeadTrace,
    attention_output_projections,
    find_head_layout,
    left_padded_positions,
    model_shape,
    set_head_layout,
)

IDS = torch.tensor([[5, 9, 12, 7, 30, 3, 17, 22], [4, 4, 8, 15, 16, 23, 42, 11]])


def _attention_module(model, layer):
    """The attention block whose output the projection produces, per architecture."""
    blocks, name = {
        "llama": (lambda: model.model.layers, "self_attn"),
        "gpt2": (lambda: model.transformer.h, "attn"),
        "gpt_neox": (lambda: model.gpt_neox.layers, "attention"),
    }[model.config.model_type]
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
    _, heads, head_dim = model_shape(model)
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
    _, heads, d = model_shape(model)
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
    _, heads, d = model_shape(model)
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
    shift = weight[:, head * d : (head + 1) * d] @ delta

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
    model.model.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(3))  # no attention left
    with pytest.raises(ValueError, match="could not find the attention output projection of llama") as err:
        attention_output_projections(model)
    assert "\n" not in str(err.value)


def test_left_padded_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert left_padded_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# ---- Layouts beyond the three fixtures: found by search, or given as an override. ----

EXPECTED_LAYOUTS = {
    "llama": ("model.layers", "self_attn.o_proj"),
    "gpt2": ("transformer.h", "attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention.dense"),
    "opt": ("model.decoder.layers", "self_attn.out_proj"),
    "phi": ("model.layers", "self_attn.dense"),
    "falcon": ("transformer.h", "self_attention.dense"),
    "bloom": ("transformer.h", "self_attention.dense"),
    "gptj": ("transformer.h", "attn.out_proj"),
}
NEW_ARCHS = ["opt", "phi", "falcon", "bloom", "gptj"]


def build(arch: str, seed: int = 0):
    """A tiny random model (3 layers, hidden 32, 4 heads of 8) of any architecture in EXPECTED_LAYOUTS."""
    import transformers as tf

    if arch in ("llama", "gpt2", "gpt_neox"):
        return tiny_model(arch, seed=seed)
    torch.manual_seed(seed)
    ids = dict(vocab_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    if arch == "opt":
        model = tf.OPTForCausalLM(
            tf.OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=128,
                **ids,
            )
        )
    elif arch == "phi":
        model = tf.PhiForCausalLM(
            tf.PhiConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=128,
                **ids,
            )
        )
    elif arch == "falcon":
        model = tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, **ids))
    elif arch == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=3, n_head=4, **ids))
    elif arch == "gptj":
        model = tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=32, n_layer=3, n_head=4, n_positions=128, rotary_dim=4, **ids))
    else:
        raise ValueError(arch)
    return model.eval().requires_grad_(False)


def test_common_projections_are_tried_in_the_documented_order():
    assert COMMON_PROJECTIONS == (
        "self_attn.o_proj",
        "self_attn.out_proj",
        "self_attn.dense",
        "self_attention.dense",
        "attn.c_proj",
        "attention.dense",
        "attn.out_proj",
    )


@pytest.mark.parametrize("arch", list(EXPECTED_LAYOUTS))
def test_layout_is_found_on_the_causal_lm_and_on_the_bare_base_model(arch):
    model = build(arch)
    blocks, proj = EXPECTED_LAYOUTS[arch]
    assert find_head_layout(model) == HeadLayout(blocks, proj)
    assert model_shape(model) == (3, 4, 8)
    projections = attention_output_projections(model)
    assert len(projections) == 3
    for block, p in zip(model.get_submodule(blocks), projections):
        assert p is block.get_submodule(proj)
    # The base model (no `model.` / `transformer.` prefix) is searched the same way.
    base = model.base_model
    assert base is not model
    assert find_head_layout(base) == HeadLayout(blocks.split(".", 1)[1], proj)
    assert model_shape(base) == (3, 4, 8)


@pytest.fixture(params=NEW_ARCHS)
def new_model(request):
    return request.param, build(request.param)


def test_recording_sees_what_a_manual_pre_hook_sees(new_model):
    _, model = new_model
    projections = attention_output_projections(model)
    seen = {}
    handles = [
        p.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0].clone()))
        for l, p in enumerate(projections)
    ]
    try:
        with HeadTrace(model, record="all") as trace:
            model(IDS)
    finally:
        for h in handles:
            h.remove()
    assert sorted(trace.activations) == [0, 1, 2]
    for layer, x in seen.items():  # x: (batch, seq, heads * head_dim)
        assert trace.activations[layer].shape == (2, IDS.shape[1], 4, 8)
        assert torch.equal(trace.activations[layer], x.view(2, IDS.shape[1], 4, 8))


def test_edit_changes_logits_as_predicted_and_exit_restores_the_model(new_model):
    """Adding delta to one head at the last position equals adding proj's linear response to it there."""
    _, model = new_model
    layer, head = 1, 2
    delta = torch.randn(8, generator=torch.Generator().manual_seed(1))
    proj = attention_output_projections(model)[layer]
    before = model(IDS).logits

    def edit(l, acts):  # acts: (batch, seq, heads, head_dim)
        acts[:, -1, head] += delta

    with HeadTrace(model, layers=[layer], edit=edit):
        edited = model(IDS).logits
    assert not torch.allclose(edited[:, -1], before[:, -1])
    torch.testing.assert_close(edited[:, :-1], before[:, :-1], atol=1e-6, rtol=1e-6)

    # Independent route, the same for nn.Linear and Conv1D: proj(e) - proj(0) is W applied to e.
    e = torch.zeros(1, 32)
    e[0, head * 8 : (head + 1) * 8] = delta
    shift = (proj(e) - proj(torch.zeros(1, 32)))[0]

    def add_shift(module, args, out):
        out = out.clone()
        out[:, -1] += shift
        return out

    handle = proj.register_forward_hook(add_shift)
    try:
        expected = model(IDS).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
    assert all(not p._forward_pre_hooks for p in attention_output_projections(model))
    torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


class OddAttention(nn.Module):
    """Causal multi-head attention whose projections have unusual names."""

    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.mix_out = nn.Linear(hidden, hidden)

    def forward(self, x):  # (batch, seq, hidden)
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, seq, head_dim)
        return self.mix_out(out.transpose(1, 2).reshape(b, s, h))


class OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.mixer = OddAttention()

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class OddDecoder(nn.Module):
    """A decoder outside every common layout: blocks at `trunk`, projection at `mixer.mix_out`."""

    def __init__(self, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(model_type="odd", num_attention_heads=4, hidden_size=32, num_hidden_layers=layers)
        self.embed = nn.Embedding(64, 32)
        self.trunk = nn.ModuleList(OddBlock() for _ in range(layers))
        self.unembed = nn.Linear(32, 64)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.trunk:
            x = block(x)
        return self.unembed(x)


ODD = HeadLayout("trunk", "mixer.mix_out")


def _one_line_error(fn, *patterns):
    with pytest.raises(ValueError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_unknown_layout_fails_with_one_line_naming_both_overrides():
    model = OddDecoder()
    for fn in (
        lambda: find_head_layout(model),
        lambda: HeadTrace(model),
        lambda: model_shape(model),
        lambda: attention_output_projections(model),
    ):
        _one_line_error(
            fn,
            "could not find the attention output projection of odd",
            "--head_layout",
            "set_head_layout",
            "self_attn.o_proj",
            "attn.out_proj",
        )


@pytest.mark.parametrize("layout", ["trunk:mixer.mix_out", ("trunk", "mixer.mix_out"), ODD])
def test_explicit_layout_on_an_unusual_decoder(layout):
    model = OddDecoder()
    assert find_head_layout(model, layout) == ODD
    assert model_shape(model, layout) == (2, 4, 8)
    seen = {}
    handle = model.trunk[1].mixer.mix_out.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    try:
        with HeadTrace(model, layout=layout, record="all") as trace:
            model(IDS)
    finally:
        handle.remove()
    assert torch.equal(trace.activations[1], seen["x"].view(2, IDS.shape[1], 4, 8))
    assert not hasattr(model, "slim_head_layout")  # an explicit layout is not stored


def test_set_head_layout_is_used_later_without_an_argument():
    model = OddDecoder()
    before = model(IDS)
    assert set_head_layout(model, "trunk:mixer.mix_out") == ODD
    assert model.slim_head_layout == ODD
    assert find_head_layout(model) == ODD
    assert model_shape(model) == (2, 4, 8)
    assert attention_output_projections(model) == [b.mixer.mix_out for b in model.trunk]

    def scramble(l, acts):  # (batch, seq, heads, head_dim)
        acts.mul_(-3.0)

    with HeadTrace(model, edit=scramble, record="last") as trace:
        changed = model(IDS)
    assert trace.activations[0].shape == (2, 4, 8)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(model(IDS), before, atol=0, rtol=0)
    # An explicit layout still wins over the stored one.
    assert find_head_layout(model, "trunk:mixer.qkv") == HeadLayout("trunk", "mixer.qkv")


def test_wrong_overrides_fail_with_one_line():
    model = build("llama")
    _one_line_error(
        lambda: set_head_layout(model, "model.layers:mlp.down_proj"),
        "model.layers:mlp.down_proj",
        "width 64",
        "4 heads x 8 = 32",
        "--head_layout",
        "set_head_layout",
    )
    _one_line_error(lambda: HeadTrace(model, layout="model.layers:mlp.down_proj"), "width 64")
    _one_line_error(
        lambda: set_head_layout(model, "model.layers:self_attn.out_proj"), "no submodule 'self_attn.out_proj'"
    )
    _one_line_error(
        lambda: set_head_layout(model, "model.blocks:self_attn.o_proj"), "no list of blocks at 'model.blocks'"
    )
    _one_line_error(lambda: set_head_layout(model, "model.norm:weight"), "no list of blocks at 'model.norm'")
    _one_line_error(lambda: model_shape(model, ("model.layers", "self_attn.o_proj.weight")), "no submodule")
    for text in ["model.layers", "a:b:c", "model..layers:self_attn.o_proj", ":self_attn.o_proj", "", ("x",)]:
        _one_line_error(lambda text=text: HeadLayout.parse(text), "BLOCKS:PROJECTION")
    assert not hasattr(model, "slim_head_layout")  # nothing stored by a failed set_head_layout
    assert find_head_layout(model) == HeadLayout("model.layers", "self_attn.o_proj")


def _block(proj_name="o_proj"):
    block = nn.Module()
    block.self_attn = nn.Module()
    block.self_attn.add_module(proj_name, nn.Linear(32, 32))
    return block


def test_search_prefers_the_list_as_long_as_the_config_says_else_the_longest():
    model = nn.Module()
    model.encoder = nn.ModuleList(_block() for _ in range(4))
    model.decoder = nn.ModuleList(_block() for _ in range(2))
    model.other = nn.ModuleList(_block("q_proj") for _ in range(6))  # no projection: never a candidate
    assert find_head_layout(model) == HeadLayout("encoder", "self_attn.o_proj")  # no config: the longest
    model.config = SimpleNamespace(n_layer=2, n_head=4, n_embd=32)
    assert find_head_layout(model) == HeadLayout("decoder", "self_attn.o_proj")
    assert model_shape(model) == (2, 4, 8)
    model.config = SimpleNamespace(num_hidden_layers=3, num_heads=4, d_model=32)  # neither: the longest again
    assert find_head_layout(model) == HeadLayout("encoder", "self_attn.o_proj")
    assert model_shape(model) == (4, 4, 8)
    model.decoder.append(_block())
    model.decoder.append(_block())  # a tie at 4: the first in module order
    assert find_head_layout(model) == HeadLayout("encoder", "self_attn.o_proj")
