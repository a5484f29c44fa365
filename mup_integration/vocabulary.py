"""The muP vocabulary, defined once: the learning-rate families, the weight-decay rules and the parameter kinds.

A leaf module (it imports nothing), so the optimizer core (:mod:`hf_optim.registry`, the ``--optim_args`` parser) can
name a family or a rule without importing the muP machinery above it. ``tests/test_layout.py`` checks that these
tuples are written nowhere else.

``FAMILIES``: how a hidden matrix's learning rate scales with the width multiplier :math:`m`
(``docs/mup.md`` §2): ``"adam"`` (entry-wise normalised updates: :math:`1/m`), ``"adam_param_scale"`` (Adafactor with
parameter scaling: :math:`1`), ``"sgd"`` (:math:`1/r`, as ``mup.MuSGD``) and ``"muon"`` (orthogonalised updates with a
width-independent spectral norm: :math:`1`).

``WD_RULES``: how weight decay follows the width (``docs/mup.md`` §3): ``"independent"`` (per-step decay
:math:`\\lambda\\eta_t/\\eta` at every width, the default), ``"mup"`` (mup 1.0.0: ``weight_decay`` times the width
multiplier with lr-coupled decay) and ``"none"`` (decay left as the optimizer has it).

``KINDS``: what a parameter is to muP (``mup_integration.plan``): a ``"hidden"`` matrix (both dims grow), a
``"vector"`` (biases, norms: at most one dim grows), an ``"embedding"`` (fan-out grows) or the ``"readout"``
(fan-in grows).
"""

from __future__ import annotations

FAMILIES: tuple[str, ...] = ("adam", "adam_param_scale", "sgd", "muon")
WD_RULES: tuple[str, ...] = ("independent", "mup", "none")
#: The rules whose decay carries across widths (a tuned weight decay transfers): all but ``"none"``.
TRANSFERABLE_WD_RULES: tuple[str, ...] = ("independent", "mup")
DEFAULT_WD_RULE = "independent"
#: The kind of a matrix whose two dims both grow with width (the one kind Muon's router sends to Muon).
HIDDEN = "hidden"
KINDS: tuple[str, ...] = (HIDDEN, "vector", "embedding", "readout")
#: The kinds whose width multiplier is the fan-in's (the others' is the fan-out's).
FAN_IN_KINDS: tuple[str, ...] = ("hidden", "readout")
