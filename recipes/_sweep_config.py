"""Sweep configuration: a YAML file → fixed model/training settings plus one or more grids, expanded into cells.

A configuration file looks like::

    name: quick
    model: {layers: 2, head_dim: 32, ffn_mult: 2, seq_len: 64, batch_size: 8, base_width: 64}
    train: {steps: 150, warmup_steps: 15, schedule: cosine, min_lr_ratio: 0.1, eval_batches: 8}
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

DEFAULT_OPTIMIZER = "adamw_v2"
# Set by the sweep itself (or by the grid's lr / weight_decay axes), so not allowed in an entry's ``args``.
_RESERVED_ARGS = {"params", "lr", "weight_decay", "weight_decay_mode", "param_overrides"}


@dataclass(frozen=True)
class ModelSettings:
    """A small LLaMA: width = hidden size; heads = width / head_dim (fixed head size, so muP's attention scale is
    a constant); MLP width = ffn_mult × width."""

    layers: int = 2
    head_dim: int = 32
    ffn_mult: int = 2
    seq_len: int = 64
    batch_size: int = 8
    base_width: int = 64  # muP base shape
    init_std: float = 0.02  # LlamaConfig.initializer_range


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 150
    warmup_steps: int = 15
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio) or "constant" (after warm-up)
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off: clipping would hide the divergence that SP shows at large lr
    eval_batches: int = 8
    train_chars: int | None = None
    diverge_loss: float = 10.0  # a training loss above this (or NaN/inf) stops the cell as diverged


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
        return hashlib.sha1(json.dumps(payload, sort_keys=True, default=float).encode()).hexdigest()[:16]

    def describe(self) -> str:
        args = "".join(f" {k}={value:g}" if isinstance(value, float) else f" {k}={value}"
                       for k, value in self.optimizer_args)
        return (f"{self.grid} {self.parametrization} w={self.width} lr=2^{math.log2(self.lr):.1f} "
                f"{self.optimizer}{args} {self.weight_decay_mode} wd={self.weight_decay:g} seed={self.seed}")


@dataclass(frozen=True)
class SweepConfig:
    name: str
    cells: list[Cell]


def _settings(cls: type, raw: dict[str, Any], where: str) -> Any:
    allowed = {f.name for f in fields(cls)}
    for key in raw:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {sorted(allowed)}.{v.closest(key, allowed)}")
    return cls(**raw)


def _override(settings: Any, raw: Any, where: str) -> Any:
    """``settings`` with the keys of ``raw`` replaced (a grid's own ``model:`` / ``train:`` block)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of settings, got {raw!r}.")
    return _settings(type(settings), {**asdict(settings), **raw}, where) if raw else settings


def _list(raw: dict[str, Any], key: str, where: str, default: list[Any] | None = None) -> list[Any]:
    value = raw.get(key, default)
    if value is None:
        raise ValueError(f"{where}: {key!r} is required (a list).")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty list, got {value!r}.")
    return value


def _learning_rates(grid: dict[str, Any], where: str) -> list[float]:
    if ("lr" in grid) == ("log2_lr" in grid):
        raise ValueError(f"{where}: give exactly one of 'lr' or 'log2_lr', got keys {sorted(grid)}.")
    if "lr" in grid:
        lrs = [float(x) for x in _list(grid, "lr", where)]
    else:
        lrs = [2.0 ** float(x) for x in _list(grid, "log2_lr", where)]
    for lr in lrs:
        v.check_positive(f"{where}: lr", lr)
    return lrs


def _expand_grid(grid: dict[str, Any], model: ModelSettings, train: TrainSettings, index: int) -> list[Cell]:
    name = grid.get("name", f"grid{index}")
    where = f"grids[{index}] ({name})"
    known = {"name", "width", "lr", "log2_lr", "parametrization", "optimizer", "seed", "model", "train"}
    for key in grid:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {sorted(known)}.{v.closest(key, known)}")
    model = _override(model, grid.get("model", {}), f"{where}.model")
    train = _override(train, grid.get("train", {}), f"{where}.train")
    widths = [int(w) for w in _list(grid, "width", where)]
    for w in widths:
        if w % model.head_dim:
            raise ValueError(f"{where}: width {w} is not a multiple of head_dim={model.head_dim}.")
    params = _list(grid, "parametrization", where, ["sp"])
    for p in params:
        v.check_choice(f"{where}: parametrization", p, ("sp", "mup"))
    optimizers = _list(grid, "optimizer", where, [{"weight_decay_mode": "coupled", "weight_decay": [0.0]}])
    opt_variants: list[tuple[str, tuple[tuple[str, Any], ...], str, float, str]] = []
    for opt in optimizers:
        if not isinstance(opt, dict):
            raise ValueError(f"{where}: each optimizer entry must be a mapping, got {opt!r}.")
        extra = set(opt) - {"name", "args", "weight_decay_mode", "weight_decay", "wd_rule"}
        if extra:
            raise ValueError(f"{where}: optimizer entry has unknown keys {sorted(extra)}; "
                             "allowed: name, args (mapping), weight_decay_mode, weight_decay (list), wd_rule.")
        opt_name = opt.get("name", DEFAULT_OPTIMIZER)
        get_spec(opt_name)  # unknown names: ValueError listing the registered ones
        args = opt.get("args", {})
        if not isinstance(args, dict) or set(args) & _RESERVED_ARGS:
            raise ValueError(f"{where}: optimizer {opt_name!r}: 'args' must be a mapping of constructor arguments "
                             f"other than {sorted(_RESERVED_ARGS)}, got {args!r}.")
        mode = opt.get("weight_decay_mode", "coupled")
        v.check_choice(f"{where}: weight_decay_mode", mode, WEIGHT_DECAY_MODES)
        wds = opt.get("weight_decay", [0.0])
        wds = wds if isinstance(wds, list) else [wds]
        # muP's weight-decay rule (mup_integration.groups): 'independent' keeps the per-step decay width-free.
        wd_rule = opt.get("wd_rule", "independent")
        for wd in wds:
            v.check_non_negative(f"{where}: weight_decay", wd)
            opt_variants.append((opt_name, tuple(sorted(args.items())), mode, float(wd), wd_rule))
    seeds = [int(s) for s in _list(grid, "seed", where, [0])]
    lrs = _learning_rates(grid, where)
    return [
        Cell(name, w, lr, p, mode, wd, rule, s, model, train, optimizer=opt, optimizer_args=args)
        for p, w, (opt, args, mode, wd, rule), s, lr in itertools.product(params, widths, opt_variants, seeds, lrs)
    ]


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML (``yaml.safe_load``) and expand it into cells (duplicates removed)."""
    path = Path(path)
    if not path.is_file():
        bundled = Path(__file__).parent / "sweeps" / f"{path.stem}.yaml"
        if not bundled.is_file():
            raise ValueError(f"config {str(path)!r} is neither a file nor a bundled sweep "
                             f"({sorted(p.stem for p in bundled.parent.glob('*.yaml'))}).")
        path = bundled
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(path)!r} must be a mapping, got {type(raw).__name__}.")
    unknown = set(raw) - {"name", "model", "train", "grids"}
    if unknown:
        raise ValueError(f"config {str(path)!r}: unknown top-level keys {sorted(unknown)}; "
                         "allowed: name, model, train, grids.")
    model = _settings(ModelSettings, raw.get("model", {}), "model")
    train = _settings(TrainSettings, raw.get("train", {}), "train")
    v.check_choice("train.schedule", train.schedule, ("cosine", "constant"))
    grids = raw.get("grids")
    if not isinstance(grids, list) or not grids:
        raise ValueError(f"config {str(path)!r}: 'grids' must be a non-empty list of grid mappings.")
    cells: dict[str, Cell] = {}
    for index, grid in enumerate(grids):
        for cell in _expand_grid(grid, model, train, index):
            cells.setdefault(cell.key, cell)
    return SweepConfig(raw.get("name", path.stem), list(cells.values()))
