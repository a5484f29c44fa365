"""Published LLM optimizer recipes (YAML, with sources) and the runner behind ``hf-optim train``."""
