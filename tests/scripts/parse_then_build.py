"""An unmodified Hugging Face script's first lines: parse the arguments, then start the expensive work.

It never imports hf_optim (``--optim adamw_v2`` works through the package's .pth hook). It prints a marker right
after ``parse_args_into_dataclasses`` so that a test can tell whether a bad ``--optim_args`` stopped it before that
line; then it builds a tiny model, standing for the data and model work a real script would do.
"""

from __future__ import annotations

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, TrainingArguments

MARKER = "ARGUMENTS-PARSED"


def main() -> None:
    torch.set_num_threads(1)
    (training_args,) = HfArgumentParser((TrainingArguments,)).parse_args_into_dataclasses()
    print(MARKER, training_args.optim_args, flush=True)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    print("MODEL-BUILT", sum(p.numel() for p in model.parameters()), flush=True)


if __name__ == "__main__":
    main()
