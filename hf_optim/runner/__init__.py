"""The application layer behind ``hf-optim train`` and ``hf-optim sweep``: recipe schema and loader, schedules,
data, training and sweep runners. It builds optimizers only through :func:`hf_optim.create_optimizer`; the recipe
YAML itself is data in the repository's ``recipes/`` folder, installed as package data of ``hf_optim.recipes``."""
