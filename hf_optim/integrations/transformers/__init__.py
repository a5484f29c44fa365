"""The Hugging Face Trainer plugin: ``trainer`` (the ``--optim`` names and their handler), ``autoload`` (the
post-import hook the ``.pth`` file installs), ``fail_fast`` (``--optim_args`` checked when ``TrainingArguments`` is
built) and ``group_logging`` (per-group lr / decay in the Trainer's logs).

Nothing is imported here: the ``.pth`` hook imports ``autoload`` at interpreter start-up.
"""
