"""The configuration documents itself: --help from the dataclasses, preset-aware; the README's table."""

import re
from dataclasses import fields

import pytest

from config import (LLAMA_SWITCHES, PRESETS, ModelConfig, SampleConfig, TrainConfig, default_preset, llama_equivalent,
                    make_configs, markdown_table)
from conftest import REPO, run_script


WIDE = {"COLUMNS": "400"}  # argparse wraps help to the terminal, and breaks words at hyphens


def help_lines(text: str) -> dict:
    """--FIELD -> its help text (argparse wraps long help over several lines)."""
    entries = re.split(r"\n  (?=--)", text)
    return {e.split()[0]: " ".join(e.split()) for e in entries if e.startswith("--")}


def test_train_help_describes_every_field_with_this_machines_defaults():
    proc = run_script("run_train.py", "--help", timeout=60, env=WIDE)
    assert proc.returncode == 0, proc.stderr
    assert "(default: None)" not in proc.stdout and "None" not in proc.stdout
    entries = help_lines(proc.stdout)
    preset = default_preset()  # cpu here: no CUDA GPU
    values = {**{f.name: f.default for cls in (ModelConfig, TrainConfig) for f in fields(cls)}, **PRESETS[preset]}
    for cls in (ModelConfig, TrainConfig):
        for f in fields(cls):
            entry = entries[f"--{f.name}"]
            assert f.metadata["help"].split()[0] in entry, f.name
            shown = str(values[f.name]).lower() if isinstance(values[f.name], bool) else str(values[f.name])
            shown = f.metadata["shown"] or shown  # vocab_size: the tokenizer's, whatever the preset says
            assert f"(default: {shown})" in entry, (f.name, entry)
    for name, choices in (("optimizer", "muon,adamw"), ("device", "auto,cuda,mps,cpu"), ("dtype", "auto,fp32,bf16,fp16"),
                          ("preset", "cpu,scale,stepwise,t4")):
        assert "{" + choices + "}" in entries[f"--{name}"], name
    assert f"(default: {preset} on this machine)" in entries["--preset"]


def test_train_help_follows_the_preset_asked_for():
    t4 = help_lines(run_script("run_train.py", "--preset", "t4", "--help", timeout=60, env=WIDE).stdout)
    scale = help_lines(run_script("run_train.py", "--help", "--preset", "scale", timeout=60, env=WIDE).stdout)
    assert "(default: 256)" in t4["--d_model"] and "(default: 2048)" in scale["--d_model"]
    assert "(default: Hosseinlack123/Blueberry-testdataset)" in t4["--dataset"]


def test_inference_help_describes_every_option():
    proc = run_script("inference.py", "--help", timeout=60, env=WIDE)
    assert proc.returncode == 0, proc.stderr
    assert "None" not in proc.stdout
    entries = help_lines(proc.stdout)
    for f in fields(SampleConfig):
        assert f.metadata["help"].split()[0] in entries[f"--{f.name}"] and "(default: " in entries[f"--{f.name}"]
    assert "(default: a fresh seed each run)" in entries["--seed"]
    assert "{auto,cuda,mps,cpu}" in entries["--device"] and "{auto,fp32,bf16,fp16}" in entries["--dtype"]
    for flag in ("--prompt", "--prompts_file", "--samples"):
        assert flag in entries


@pytest.mark.parametrize("script, args, needle", [
    ("inference.py", ["--temperature", "-1"], "temperature"),
    ("inference.py", ["--top_p", "0"], "top_p"),
    ("inference.py", ["--dtype", "fp8"], "--dtype"),
    ("run_train.py", ["--preset", "huge"], "--preset"),
])
def test_bad_values_are_one_line(script, args, needle):
    from conftest import assert_one_line_error
    assert_one_line_error(run_script(script, *args, timeout=60), needle)


def test_readme_configuration_table_is_the_dataclasses():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "README's configuration table is stale: paste `python config.py --markdown`"


def test_llama_switches_are_defined_once_and_make_plain_llama():
    cfg = ModelConfig()
    assert set(cfg.non_llama_features()) == {"embed_scale", "sandwich_norm", "qk_norm", "attn_gate", "mlp", "bigram_buckets",
                                             "pyramidal MLP (ffn_mult_first != ffn_mult_last)"}
    plain = llama_equivalent(cfg)
    assert plain.non_llama_features() == [] and all(getattr(plain, k) == v for k, v in LLAMA_SWITCHES.items())
    assert {plain.ffn_hidden(i) for i in range(plain.n_layers)} == {cfg.ffn_hidden(0)}
    assert llama_equivalent(cfg, zero_init=True).non_llama_features() == []  # init switches only pick start values
    model_cfg, _ = make_configs("cpu", **LLAMA_SWITCHES)
    assert model_cfg.d_model == 128 and not model_cfg.attn_gate
