"""A plain Hugging Face training script: HfArgumentParser + Trainer, nothing else (but the ending of a launched
rank, :func:`end_launched_rank`).

It never imports hf_optim: ``--optim adafactor_v2`` works only through the package's import hook (.pth). The tests
run it in fresh interpreters, alone and under ``accelerate launch``. The model is a tiny LLaMA built from a config and
the data are in-memory token sequences that follow a learnable rule, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    num_examples: int = 64
    seq_len: int = 16
    vocab_size: int = 64
    hidden_size: int = 32
    dump_rank_params: bool = False  # write params_rank{r}.pt from every rank (to compare ranks)


class RuleDataset(torch.utils.data.Dataset):
    """Sequences x_k = (a + b·k) mod V with (a, b) drawn per example: predictable after two tokens."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        a = torch.randint(0, vocab, (n, 1), generator=g)
        b = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (a + b * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def end_launched_rank() -> None:
    """Under a launcher (``WORLD_SIZE`` > 1): wait for every rank, flush, and leave with ``os._exit(0)``.

    Why not a plain return: torch's teardown of a gloo process group that the Trainer leaves alive can abort or hang
    a rank whose run has already succeeded (torch 2.13 CPU, measured). gloo's worker threads free each finished
    collective's work object, and with it the Python references of its tensors, which takes the GIL. At
    interpreter finalization that GIL request ends the thread inside a destructor: "terminate called without an
    active exception", SIGABRT (pytorch/pytorch#179291). ``destroy_process_group()`` first is no cure: the DDP
    reducer then holds the group's last reference, and freeing it joins those threads while holding the GIL, a
    deadlock (gdb: ``~Reducer`` -> ``~ProcessGroupGloo`` -> ``thread::join`` on the main thread,
    ``~AsyncAllgatherWork`` -> ``take_gil`` on a ``pt_gloo_runloop`` thread). Every output is written and closed before this is called, so skipping the teardown loses nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    torch.distributed.barrier()  # no rank leaves while another still exchanges data with it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    torch.set_num_threads(1)
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(training_args.seed)
    config = LlamaConfig(
        vocab_size=script_args.vocab_size,
        hidden_size=script_args.hidden_size,
        intermediate_size=2 * script_args.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    dataset = RuleDataset(script_args.num_examples, script_args.seq_len, script_args.vocab_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    if script_args.dump_rank_params:
        rank = int(os.environ.get("RANK", "0"))
        state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
        torch.save(state, os.path.join(training_args.output_dir, f"params_rank{rank}.pt"))
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "summary.json"), "w") as f:
            json.dump(
                {
                    "optimizer": type(trainer.optimizer.optimizer).__module__
                    + "."
                    + type(trainer.optimizer.optimizer).__name__
                    if hasattr(trainer.optimizer, "optimizer")
                    else type(trainer.optimizer).__qualname__,
                    "log_history": trainer.state.log_history,
                },
                f,
            )
    end_launched_rank()


if __name__ == "__main__":
    main()
