"""Checkpoint resume through the Trainer is bitwise (CPU) for adamw_v2 and adafactor_v2 (bf16 momentum)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config

import hf_optim  # noqa: F401  (registers the names)

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_tiny_clm import RuleDataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments


def _train(out: Path, name: str, resume: str | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = TrainingArguments(
        output_dir=str(out),
        optim=name,
        learning_rate=1e-2,
        weight_decay=1e-4,
        max_steps=20,
        save_steps=10,
        save_strategy="steps",
        per_device_train_batch_size=8,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        optim_args="weight_decay_mode=independent" if name == "adamw_v2" else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(160, 16, 64))
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["adamw_v2", "adafactor_v2"])
def test_resume_from_checkpoint_is_bitwise(tmp_path, name):
    full = _train(tmp_path / "full", name)
    checkpoint = tmp_path / "full" / "checkpoint-10"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["state"] and all(isinstance(g["lr"], float) for g in state["param_groups"])
    if name == "adafactor_v2":  # the preset keeps momentum in bfloat16: it must survive the round trip
        dtypes = {t.dtype for s in state["state"].values() for t in s.values() if torch.is_tensor(t) and t.dim()}
        assert torch.bfloat16 in dtypes
    resumed = _train(tmp_path / "resumed", name, resume=str(checkpoint))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    # and training did move the parameters (the comparison is not between two untouched models)
    torch.manual_seed(0)
    init = LlamaForCausalLM(tiny_llama_config()).state_dict()
    assert not torch.equal(init["model.layers.0.mlp.up_proj.weight"], full["model.layers.0.mlp.up_proj.weight"])
