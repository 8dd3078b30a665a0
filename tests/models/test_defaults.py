"""ITI's K chosen per model (slim.models.defaults): the paper's models keep 48, the others take SmolLM2's share of
24 heads in 270 of theirs; the command the shell scripts call."""

import subprocess
import sys

import pytest
from transformers import LlamaConfig

from conftest import REPO
from slim.models.defaults import PAPER_MODELS, RULES, iti_num_heads, main, smollm2_share


def share(total_heads):
    """The rule by hand: 24 / 270 of the heads, rounded half up, at least 1."""
    return max(1, int(total_heads * 24 / 270 + 0.5))


@pytest.mark.parametrize(
    "model, k, rule",
    [
        ("smollm2_135M", 24, "smollm2_share"),
        ("gemma3_270M", 6, "smollm2_share"),
        ("huggyllama/llama-7b", 48, "paper_48"),
    ]
    + [(key, 48, "paper_48") for key in PAPER_MODELS],
)
def test_the_rule_on_the_registry_models(model, k, rule):
    chosen = iti_num_heads(model)
    assert (chosen.k, chosen.rule, chosen.note) == (k, rule, None) and rule in RULES


def test_the_share_is_rounded_and_never_zero():
    assert smollm2_share(270) == 24 and smollm2_share(72) == 6  # 6.4
    assert smollm2_share(1024) == 91  # 91.02: what LLaMA-7B would get were it not one of the paper's models
    assert smollm2_share(90) == 8 and smollm2_share(5) == 1 and smollm2_share(1) == 1  # 8.0; 0.44 -> at least 1
    assert [smollm2_share(n) for n in range(1, 400)] == [share(n) for n in range(1, 400)]


def test_another_model_takes_the_share_of_the_heads_its_config_names(tmp_path):
    folder = tmp_path / "other"
    LlamaConfig(num_hidden_layers=12, num_attention_heads=12, hidden_size=96).save_pretrained(folder)
    chosen = iti_num_heads(str(folder))  # 144 heads: 12.8 -> 13, read from config.json alone (no weights there)
    assert (chosen.k, chosen.rule, chosen.total_heads) == (share(144), "smollm2_share", 144) and chosen.k == 13
    # a name that is not a key, loaded from a folder (--model_dir): that folder's config
    assert iti_num_heads("my_model", model_dir=str(folder)).k == 13
    # a registry key keeps its rule whatever folder it is loaded from (a local copy of the paper's model)
    assert iti_num_heads("llama_7B", model_dir=str(folder)).k == 48


def test_an_unreadable_config_falls_back_to_48_with_a_note(tmp_path):
    chosen = iti_num_heads(str(tmp_path))  # a folder without config.json
    assert (chosen.k, chosen.rule) == (48, "fallback_48")
    assert "\n" not in chosen.note and "NUM_HEADS" in chosen.note and str(tmp_path) in chosen.note


def test_the_command_prints_k_and_ignores_the_flags_it_does_not_know(tmp_path, capsys):
    folder = tmp_path / "other"
    LlamaConfig(num_hidden_layers=4, num_attention_heads=8, hidden_size=64).save_pretrained(folder)
    # the shell scripts pass their extra arguments on: --model_dir among them decides a name's config
    flags = ["--device", "cpu", "--judge_name", "local:/x", "--model_dir", str(folder), "--epochs", "5"]
    main(["num_heads", "my_model", *flags])
    assert capsys.readouterr().out == f"{share(32)}\n"
    main(["num_heads", str(tmp_path / "nothing"), "--with_rule"])
    out, err = capsys.readouterr()
    assert out == "48 fallback_48\n" and err.startswith("note: ITI's K for") and err.count("\n") == 1


def test_the_command_as_the_shell_calls_it():
    proc = subprocess.run(
        [sys.executable, "-m", "slim.models.defaults", "num_heads", "gemma3_270M", "--with_rule", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout == "6 smollm2_share\n", proc.stderr[-2000:]
