"""Integrations with other libraries' training loops; ``transformers`` is the Trainer plugin."""
