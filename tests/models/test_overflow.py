"""The finiteness guard on edited activations: an fp16 edit past 65504 stops in one line, nothing else changes."""

import pytest
import torch

from conftest import random_policy, tiny_model
from slim.answering.decoding import greedy_tokens
from slim.models.heads import EditOverflow, HeadTrace


def blow_up(layer, acts):
    return (acts.float() * 1e6 + 1e5).to(acts.dtype)  # in fp32 as the policies compute, cast back


def test_an_fp16_edit_past_65504_raises_one_line_on_exit():
    model = tiny_model("llama").half()  # fp16 forward passes run on the CPU too
    ids = torch.tensor([[3, 4, 5, 6]])
    with pytest.raises(EditOverflow) as err:
        with HeadTrace(model, layers=[1], edit=blow_up):
            model(ids)
    message = str(err.value)
    assert err.value.layer == 1 and "\n" not in message
    assert "layer 1" in message and "65504" in message and "--dtype bf16 or fp32" in message
    assert isinstance(err.value, ValueError)  # the scripts print it as one `error:` line


def test_finite_edits_and_other_dtypes_pass():
    ids = torch.tensor([[3, 4, 5, 6]])
    half = tiny_model("llama").half()
    with HeadTrace(half, layers=[1], edit=lambda layer, a: a * 2):
        half(ids)
    for dtype in (torch.float32, torch.bfloat16):  # float32's range: 1e6 is no overflow
        model = tiny_model("llama").to(dtype)
        with HeadTrace(model, layers=[1], edit=blow_up):
            model(ids)


def test_an_error_inside_the_block_is_not_replaced():
    model = tiny_model("llama").half()
    with pytest.raises(KeyError):
        with HeadTrace(model, layers=[1], edit=blow_up):
            model(torch.tensor([[3, 4, 5]]))
            raise KeyError("mine")


def test_a_policy_that_overflows_while_answering_stops_the_batch(tokenizer):
    model = tiny_model("llama", max_positions=512).half()
    policy = random_policy("slim", model, kappa=1.0)
    policy.A.mul_(1e6)  # an ill-conditioned map
    with pytest.raises(EditOverflow, match="the edit at layer 1 produced values outside float16's range"):
        greedy_tokens(model, tokenizer, ["Q: who? A:", "Q: why? A:"], 3, edit=policy)
    # the same policy in fp32 answers without a word (its numbers are untouched by the guard)
    model32 = tiny_model("llama", max_positions=512)
    greedy_tokens(model32, tokenizer, ["Q: who? A:"], 3, edit=random_policy("slim", model32, kappa=1.0))
