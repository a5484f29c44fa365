"""A sweep horizon in characters per parameter (``train.tokens_per_param``) and a warm-up as a share of the run
(``train.warmup_fraction``): parameter counts against the built models and the LLaMA formula, step counts against
ceil(rho N / (B S)), and the config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_optim.runner._sweep_config import ModelSettings, TrainSettings, load_config
from hf_optim.runner._sweep_data import vocab_size
from hf_optim.runner._sweep_model import fit_horizon, model_class, model_config, parameter_count

EXPERIMENTS = Path(__file__).parent.parent / "docs" / "experiments"
CONFIG = """
name: tpp
model: {layers: 1, head_dim: 16, ffn_mult: 2, seq_len: 16, batch_size: 4, base_width: 32, base_depth: 1}
train: {tokens_per_param: 0.5, warmup_fraction: 0.1, eval_batches: 1}
grids:
  - name: g
    width: [32]
    depth: [1, 3]
    log2_lr: [-8]
    parametrization: [mup, completep]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tpp.yaml"
    path.write_text(text)
    return path


def _llama_params(layers: int, width: int, ffn: int) -> int:
    """LLaMA without biases, untied: per block q, k, v, o (w x w), gate, up (ffn x w), down (w x ffn) and two RMSNorm
    gains; then the embedding, the final norm and the readout (V x w each, the norm w)."""
    per_block = 4 * width * width + 3 * ffn * width + 2 * width
    return layers * per_block + 2 * vocab_size() * width + width


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
@pytest.mark.parametrize("layers, width", [(1, 32), (3, 64)])
def test_parameter_count_is_the_built_models(arch, layers, width):
    model = ModelSettings(arch=arch, layers=layers, head_dim=16, ffn_mult=2)
    built = model_class(arch)(model_config(model, width))
    assert parameter_count(model, width) == sum(p.numel() for p in built.parameters())
    if arch == "llama":
        assert parameter_count(model, width) == _llama_params(layers, width, 2 * width)


def test_fit_horizon_sets_steps_and_warmup_from_the_model_size():
    model = ModelSettings(layers=4, head_dim=16, ffn_mult=2, seq_len=64, batch_size=32)
    n = _llama_params(4, 32, 64)
    train = fit_horizon(TrainSettings(tokens_per_param=20.0, warmup_fraction=0.1), model, 32)
    assert train.steps == math.ceil(20 * n / (32 * 64))
    assert train.warmup_steps == round(0.1 * train.steps)
    # nothing to fit: unchanged
    assert fit_horizon(TrainSettings(steps=7, warmup_steps=2), model, 32) == TrainSettings(steps=7, warmup_steps=2)
    # a fraction alone scales the fixed step count
    assert fit_horizon(TrainSettings(steps=200, warmup_fraction=0.25), model, 32).warmup_steps == 50


def test_a_grid_over_depth_gets_a_horizon_per_depth(tmp_path):
    cells = load_config(_write(tmp_path, CONFIG)).cells
    by_depth = {c.model.layers: c.train for c in cells}
    for layers, train in by_depth.items():
        expected = math.ceil(0.5 * _llama_params(layers, 32, 64) / (4 * 16))
        assert train.steps == expected and train.warmup_steps == round(0.1 * expected)
    assert by_depth[3].steps > 2 * by_depth[1].steps  # the same share of each model's own budget
    # the parametrizations of one depth train for the same horizon, and the keys tell the depths apart
    assert len({c.key for c in cells}) == len(cells) == 4
    assert {c.train.steps for c in cells if c.model.layers == 3} == {by_depth[3].steps}


def test_a_grids_own_step_count_wins_over_an_inherited_horizon(tmp_path):
    text = CONFIG.replace("    parametrization: [mup, completep]", "    parametrization: [mup]\n    train: {steps: 9}")
    cells = load_config(_write(tmp_path, text)).cells
    assert {c.train.steps for c in cells} == {9} and {c.train.tokens_per_param for c in cells} == {None}
    # and the other way round: a grid's horizon over an inherited step count
    text = CONFIG.replace("tokens_per_param: 0.5, warmup_fraction: 0.1", "steps: 9, warmup_steps: 1")
    text = text.replace(
        "    parametrization: [mup, completep]", "    parametrization: [mup]\n    train: {tokens_per_param: 0.5}"
    )
    steps = {c.model.layers: c.train.steps for c in load_config(_write(tmp_path, text)).cells}
    assert steps == {d: math.ceil(0.5 * _llama_params(d, 32, 64) / 64) for d in (1, 3)}


@pytest.mark.parametrize(
    "edit, message",
    [
        (("tokens_per_param: 0.5,", "tokens_per_param: 0.5, steps: 10,"), "one of 'steps' or 'tokens_per_param'"),
        (("warmup_fraction: 0.1,", "warmup_fraction: 0.1, warmup_steps: 3,"), "one of 'warmup_steps' or 'warmup_fr"),
        (("tokens_per_param: 0.5", "tokens_per_param: 0"), r"train.tokens_per_param must be > 0 or null, got 0.0"),
        (("warmup_fraction: 0.1", "warmup_fraction: 1.0"), r"train.warmup_fraction must be in \[0, 1\)"),
        (("tokens_per_param: 0.5", "tokens_per_param: twenty"), "tokens_per_param"),
        (
            (
                "parametrization: [mup, completep]",
                "parametrization: [mup]\n    train: {steps: 3, tokens_per_param: 1.0}",
            ),
            r"grids\[0\] \(g\).train: give one of 'steps'",
        ),
    ],
)
def test_bad_horizon_config_names_the_problem(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, CONFIG.replace(*edit)))


def test_configs_without_a_horizon_keep_their_committed_keys():
    """The new fields stay out of the cell key when unset, so the committed sweeps still resume."""
    for config, folder in [("depth_transfer_long", "depth_transfer_long"), ("full_width_transfer", "width_transfer")]:
        committed = {
            json.loads(line)["key"]
            for line in (EXPERIMENTS / folder / "results.jsonl").read_text().splitlines()
            if line.strip()
        }
        assert {c.key for c in load_config(config).cells} <= committed


def test_parameter_count_allocates_nothing():
    model = ModelSettings(layers=64, head_dim=64, ffn_mult=4)
    # a 17B-parameter model (70 GB in float32) counted on the meta device: allocating it would fail here
    assert parameter_count(model, 4096) == _llama_params(64, 4096, 4 * 4096)
