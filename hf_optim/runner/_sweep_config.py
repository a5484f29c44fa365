"""Sweep configuration: a YAML file → fixed model/training settings plus one or more grids, expanded into cells.

A configuration file looks like::

    name: quick
    model: {arch: llama, layers: 2, head_dim: 32, ffn_mult: 2, seq_len: 64, batch_size: 8, base_width: 64}
    train: {steps: 150, warmup_steps: 15, schedule: cosine, min_lr_ratio: 0.1, eval_batches: 8, decay: all}
    grids:
      - name: width_transfer
        width: [64, 128]
        log2_lr: [-10, -9, -8]            # learning rates 2^-10 ... (or `lr: [...]`)
        parametrization: [sp, mup]
        optimizer:
          - {weight_decay_mode: coupled, weight_decay: [0.0]}          # name defaults to adamw_v2
          - {name: sgdw_v2, args: {momentum: 0.9}, weight_decay: [0.0]}
        seed: [0, 1]

Every grid is the Cartesian product of its lists. An ``optimizer`` entry names a registered optimizer (``name``,
default ``adamw_v2``; ``hf-optim list``), fixed constructor ``args``, a ``weight_decay_mode`` and its own
``weight_decay`` list (the meaningful λ range of ``coupled`` and ``independent`` decay differ by a factor ~lr).
Under muP the optimizer's registered muP family (Adam-like or SGD) picks the learning-rate rule. A grid may override any
``model``/``train`` key (e.g. ``train: {train_chars: 20000}``). A cell's key is a hash of everything that affects its
result, which is what makes sweeps resumable.

``model.arch`` picks the architecture: ``llama`` (pre-norm LLaMA) or ``olmo2`` (OLMo-2: QK-norm on q and k and an
RMSNorm on each block's output before the residual add, which makes the hidden matrices scale-invariant).
``train.decay`` picks the decayed tensors: ``all`` (every >= 2-D tensor, embedding and lm_head included) or
``hidden`` (only the attention q/k/v/o and MLP gate/up/down matrices). See docs/experiments/README.md for why this
decides which decay mode keeps the best λ in place.

A grid may instead vary the depth at one width: ``depth: [2, 4, 8, 16]`` sets ``model.layers`` per cell, and the
parametrizations ``depth_mup`` (branch multiplier (L/L0)^-0.5) and ``completep`` ((L/L0)^-1), with the lr and eps rules
of mup_integration.depth, need ``model.base_depth`` (L0); ``mup`` is width-only muP, ``sp`` the HF model.

The horizon may be set per model size instead of in steps: ``train: {tokens_per_param: 20, warmup_fraction: 0.1}``
gives each cell ceil(20 N / (batch_size x seq_len)) steps for its model's N parameters (characters are the tokens),
so a depth grid trains every depth at the same share of its own budget (:mod:`._sweep_model`). A block gives
``steps`` or ``tokens_per_param`` (``warmup_steps`` or ``warmup_fraction``), not both; a grid's own wins.

A grid may also tune muP's base multipliers at one width: lists ``output_mult``, ``attn_mult`` and ``init_std``
(every combination, see :mod:`._sweep_axes`); a later grid then transfers the best ones to other widths with
``model: {output_mult: ..., attn_mult: ..., init_std: ...}``.

Every value is type-checked at load (YAML 1.1 reads ``1e-1`` without a dot as a *string*: write ``1.0e-1``), and
integers (widths, seeds, steps) must be integers: ``48.9`` is an error, not 48. A weight decay of 0 is the same run
in every decay mode, so it is expanded once (as ``coupled``) and shared by every mode's heat-map.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hf_optim import _validation as v
from hf_optim.decay import WEIGHT_DECAY_MODES
from hf_optim.registry import get_spec
from mup_integration.vocabulary import WD_RULES

from ._sweep_axes import DEPTH_ALPHA, MULTIPLIER_AXES, depth_axis, multiplier_axes
from ._sweep_model import fit_horizon
from ._sweep_settings import EXCLUSIVE_TRAIN_KEYS, ModelSettings, TrainSettings, checked_settings
from ._sweep_values import as_float, as_int, as_list
from .bundled import recipes_dir

DEFAULT_OPTIMIZER = "adamw_v2"
PARAMETRIZATIONS = ("sp", "mup", *DEPTH_ALPHA)
# Set by the sweep itself (or by the grid's lr / weight_decay axes), so not allowed in an entry's ``args``.
_RESERVED_ARGS = {"params", "lr", "weight_decay", "weight_decay_mode", "param_overrides"}


@dataclass(frozen=True)
class Cell:
    """One training run."""

    grid: str
    width: int
    lr: float
    parametrization: str
    weight_decay_mode: str
    weight_decay: float
    wd_rule: str
    seed: int
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    optimizer: str = DEFAULT_OPTIMIZER
    optimizer_args: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs: hashable and order-free

    @property
    def key(self) -> str:
        payload = asdict(self)
        # The optimizer fields joined the key later: left out at their defaults, so the keys of results recorded
        # before them (the committed AdamW sweeps) stay valid and resuming does not re-run them.
        if payload["optimizer"] == DEFAULT_OPTIMIZER:
            del payload["optimizer"]
        if not payload["optimizer_args"]:
            del payload["optimizer_args"]
        # Same for the architecture, norm-eps and decayed-set options: the committed llama / decay-all results keep
        # their keys.
        if payload["model"]["arch"] == "llama":
            del payload["model"]["arch"]
        if payload["model"]["norm_eps"] is None:
            del payload["model"]["norm_eps"]
        if payload["model"]["base_depth"] is None:
            del payload["model"]["base_depth"]
        for name in ("output_mult", "attn_mult"):
            if payload["model"][name] == 1.0:
                del payload["model"][name]
        if payload["train"]["decay"] == "all":
            del payload["train"]["decay"]
        for name in ("tokens_per_param", "warmup_fraction"):
            if payload["train"][name] is None:
                del payload["train"][name]
        return hashlib.sha1(json.dumps(payload, sort_keys=True, default=float).encode()).hexdigest()[:16]

    def describe(self) -> str:
        args = "".join(
            f" {k}={value:g}" if isinstance(value, float) else f" {k}={value}" for k, value in self.optimizer_args
        )
        arch = "" if self.model.arch == "llama" else f" {self.model.arch}"
        decay = "" if self.train.decay == "all" else f" decay={self.train.decay}"
        mode = "no-decay" if self.weight_decay == 0 else self.weight_decay_mode
        depth = "" if self.model.base_depth is None else f" L={self.model.layers}"
        mults = "".join(
            f" {name}={getattr(self.model, name):g}"
            for name in ("output_mult", "attn_mult")
            if getattr(self.model, name) != 1
        )
        return (
            f"{self.grid}{arch} {self.parametrization} w={self.width}{depth}{mults} lr=2^{math.log2(self.lr):.1f} "
            f"{self.optimizer}{args} {mode} wd={self.weight_decay:g}{decay} seed={self.seed}"
        )


@dataclass(frozen=True)
class SweepConfig:
    name: str
    cells: list[Cell]


def _settings(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of settings, got {raw!r}.")
    allowed = {f.name for f in fields(cls)}
    for key in raw:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {sorted(allowed)}.{v.closest(key, allowed)}")
    return cls(**checked_settings(cls, raw, where))


def _train_settings(raw: Any, where: str, inherited: TrainSettings | None = None) -> TrainSettings:
    """A ``train`` block (the top-level one, or a grid's over ``inherited``). A block gives at most one way of each
    setting in :data:`EXCLUSIVE_TRAIN_KEYS`; its own ``steps`` (``warmup_steps``) wins over an inherited ``tokens_per_param``
    (``warmup_fraction``), which otherwise decides (fit_horizon derives the step counts from it)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of settings, got {raw!r}.")
    for pair in EXCLUSIVE_TRAIN_KEYS:
        if all(raw.get(key) is not None for key in pair):
            raise ValueError(f"{where}: give one of {pair[0]!r} or {pair[1]!r}, not both.")
    if inherited is None:
        return _settings(TrainSettings, raw, where)
    overridden = {derived: None for given, derived in EXCLUSIVE_TRAIN_KEYS if raw.get(given) is not None}
    return _settings(TrainSettings, {**asdict(inherited), **overridden, **raw}, where)


def _override(settings: Any, raw: Any, where: str) -> Any:
    """``settings`` with the keys of ``raw`` replaced (a grid's own ``model:`` / ``train:`` block)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of settings, got {raw!r}.")
    return _settings(type(settings), {**asdict(settings), **raw}, where) if raw else settings


def _learning_rates(grid: dict[str, Any], where: str) -> list[float]:
    if ("lr" in grid) == ("log2_lr" in grid):
        raise ValueError(f"{where}: give exactly one of 'lr' or 'log2_lr', got keys {sorted(grid)}.")
    if "lr" in grid:
        lrs = [as_float(f"{where}: lr", x) for x in as_list(grid, "lr", where)]
    else:
        lrs = [2.0 ** as_float(f"{where}: log2_lr", x) for x in as_list(grid, "log2_lr", where)]
    for lr in lrs:
        if lr <= 0:
            raise ValueError(f"{where}: lr must be > 0, got {lr!r}.")
    return lrs


def _expand_grid(grid: dict[str, Any], model: ModelSettings, train: TrainSettings, index: int) -> list[Cell]:
    name = grid.get("name", f"grid{index}")
    where = f"grids[{index}] ({name})"
    known = {"name", "width", "depth", *MULTIPLIER_AXES, "lr", "log2_lr", "parametrization", "optimizer", "seed"}
    known |= {"model", "train"}
    for key in grid:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {sorted(known)}.{v.closest(key, known)}")
    model = _override(model, grid.get("model", {}), f"{where}.model")
    train = _train_settings(grid.get("train", {}), f"{where}.train", train)
    widths = [as_int(f"{where}: width", w) for w in as_list(grid, "width", where)]
    for w in widths:
        if w < model.head_dim:
            raise ValueError(f"{where}: width {w} is smaller than head_dim={model.head_dim}.")
        if w % model.head_dim:
            raise ValueError(f"{where}: width {w} is not a multiple of head_dim={model.head_dim}.")
    params = as_list(grid, "parametrization", where, ["sp"])
    for p in params:
        v.check_choice(f"{where}: parametrization", p, PARAMETRIZATIONS)
    models = depth_axis(grid, model, widths, params, where)
    models = multiplier_axes(grid, models, widths, params, where)
    optimizers = as_list(grid, "optimizer", where, [{"weight_decay_mode": "coupled", "weight_decay": [0.0]}])
    opt_variants: list[tuple[str, tuple[tuple[str, Any], ...], str, float, str]] = []
    for opt in optimizers:
        if not isinstance(opt, dict):
            raise ValueError(f"{where}: each optimizer entry must be a mapping, got {opt!r}.")
        extra = set(opt) - {"name", "args", "weight_decay_mode", "weight_decay", "wd_rule"}
        if extra:
            raise ValueError(
                f"{where}: optimizer entry has unknown keys {sorted(extra)}; "
                "allowed: name, args (mapping), weight_decay_mode, weight_decay (list), wd_rule."
            )
        opt_name = opt.get("name", DEFAULT_OPTIMIZER)
        get_spec(opt_name)  # unknown names: ValueError listing the registered ones
        args = opt.get("args", {})
        if not isinstance(args, dict) or set(args) & _RESERVED_ARGS:
            raise ValueError(
                f"{where}: optimizer {opt_name!r}: 'args' must be a mapping of constructor arguments "
                f"other than {sorted(_RESERVED_ARGS)}, got {args!r}."
            )
        mode = opt.get("weight_decay_mode", "coupled")
        v.check_choice(f"{where}: weight_decay_mode", mode, WEIGHT_DECAY_MODES)
        wds = opt.get("weight_decay", [0.0])
        wds = wds if isinstance(wds, list) else [wds]
        # muP's weight-decay rule (mup_integration.groups): 'independent' keeps the per-step decay width-free.
        wd_rule = opt.get("wd_rule", "independent")
        v.check_choice(f"{where}: wd_rule", wd_rule, WD_RULES)
        for wd in wds:
            wd = as_float(f"{where}: weight_decay", wd)
            if wd < 0:
                raise ValueError(f"{where}: weight_decay must be >= 0, got {wd!r}.")
            # λ = 0 is one run whatever the mode (or muP wd rule): expand it once, as the default 'coupled', so
            # an LR x WD grid does not train the no-decay column twice; the heat-maps share it between modes.
            if wd == 0:
                opt_variants.append((opt_name, tuple(sorted(args.items())), "coupled", 0.0, "independent"))
            else:
                opt_variants.append((opt_name, tuple(sorted(args.items())), mode, wd, wd_rule))
    seeds = [as_int(f"{where}: seed", s) for s in as_list(grid, "seed", where, [0])]
    lrs = _learning_rates(grid, where)
    return [
        Cell(name, w, lr, p, mode, wd, rule, s, m, fit_horizon(train, m, w), optimizer=opt, optimizer_args=args)
        for p, w, m, (opt, args, mode, wd, rule), s, lr in itertools.product(
            params, widths, models, opt_variants, seeds, lrs
        )
    ]


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML (``yaml.safe_load``) and expand it into cells (duplicates removed)."""
    path = Path(path)
    if not path.is_file():
        bundled = recipes_dir() / "sweeps" / f"{path.stem}.yaml"
        if not bundled.is_file():
            raise ValueError(
                f"config {str(path)!r} is neither a file nor a bundled sweep "
                f"({sorted(p.stem for p in bundled.parent.glob('*.yaml'))})."
            )
        path = bundled
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(path)!r} must be a mapping, got {type(raw).__name__}.")
    unknown = set(raw) - {"name", "model", "train", "grids"}
    if unknown:
        raise ValueError(
            f"config {str(path)!r}: unknown top-level keys {sorted(unknown)}; allowed: name, model, train, grids."
        )
    model = _settings(ModelSettings, raw.get("model") or {}, "model")
    train = _train_settings(raw.get("train") or {}, "train")
    grids = raw.get("grids")
    if not isinstance(grids, list) or not grids:
        raise ValueError(f"config {str(path)!r}: 'grids' must be a non-empty list of grid mappings.")
    cells: dict[str, Cell] = {}
    for index, grid in enumerate(grids):
        for cell in _expand_grid(grid, model, train, index):
            cells.setdefault(cell.key, cell)
    return SweepConfig(raw.get("name", path.stem), list(cells.values()))
