"""muP for Hugging Face models: a name-keyed plan, model surgery, and plain per-parameter optimizer multipliers."""
