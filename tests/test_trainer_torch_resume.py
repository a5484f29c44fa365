"""A checkpoint written with ``--optim adamw_torch`` resumes with ``--optim adamw_v2``: no error, the moments and the
step carry over, and the run continues as the torch run does (parameters within 1e-5, the logged loss within 1e-4).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import tiny_llama_config

import hf_optim  # noqa: F401  (registers the names)

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_tiny_clm import RuleDataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments


def _train(out: Path, name: str, resume: str | None = None) -> tuple[dict[str, torch.Tensor], list[dict], Trainer]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = TrainingArguments(
        output_dir=str(out),
        optim=name,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_steps=20,
        save_steps=10,
        save_strategy="steps",
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RuleDataset(160, 16, 64))
    trainer.train(resume_from_checkpoint=resume)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return params, [e for e in trainer.state.log_history if "loss" in e], trainer


def test_adamw_torch_checkpoint_resumes_with_adamw_v2(tmp_path):
    full, full_log, _ = _train(tmp_path / "torch", "adamw_torch")
    checkpoint = tmp_path / "torch" / "checkpoint-10"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert "implementation" not in saved["param_groups"][0]  # a torch state dict, not ours
    resumed, resumed_log, trainer = _train(tmp_path / "ours", "adamw_v2", resume=str(checkpoint))

    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(optimizer).__name__ == "AdamW" and type(optimizer).__module__ == "hf_optim.optim.adam.optimizers"
    assert all(int(s["step"]) == 20 for s in optimizer.state.values())  # 10 loaded + 10 continued
    by_step = {e["step"]: e["loss"] for e in full_log}
    continued = [e for e in resumed_log if e["step"] > 10]  # the history also holds the checkpoint's entries
    assert [e["step"] for e in continued] == list(range(11, 21))
    for entry in continued:  # the loss continues the torch run's curve
        assert abs(entry["loss"] - by_step[entry["step"]]) <= 1e-4 * abs(by_step[entry["step"]]), entry
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-5, rtol=0)
    torch.manual_seed(0)
    init = LlamaForCausalLM(tiny_llama_config()).state_dict()
    assert not torch.equal(init["model.layers.0.mlp.up_proj.weight"], full["model.layers.0.mlp.up_proj.weight"])
