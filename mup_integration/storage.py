"""Where the plan lives in a Hugging Face config, and what happens when upstream transformers' muP fields are there.

The plan is stored as ``config.hf_optim_mup`` (a JSON dict, :meth:`MuPPlan.to_dict`). Versions before this module
wrote it as ``config.mup``; transformers pull request 45848 (open, not released) proposes ``config.mup: bool`` and
``config.mup_base_width: int``, applying its own readout swap and learning-rate split to every config whose ``mup``
is truthy, which would read our old dict as "muP on" and apply a second muP on top of ours. Hence:

==========================================  ==========================================================================
config carries                               this project does
==========================================  ==========================================================================
``hf_optim_mup`` (dict)                      the plan
``mup`` (dict, old checkpoints)              the plan (read as before); :func:`store_plan` moves it to
                                             ``hf_optim_mup`` and deletes ``mup``, so a re-saved checkpoint is never
                                             claimed by upstream
old ``mup`` dict + ``mup_base_width``        the plan, if ``mup_base_width`` equals the plan's base hidden size
                                             (then both describe one muP, ours); ValueError if they disagree
``mup: true`` (+ ``mup_base_width``)         refused on an existing model (``get_plan``, ``has_plan``, ``apply_mup``,
                                             the Trainer plugin): transformers may already have changed it, and two
                                             muP surgeries must never meet. Adopted by ``make_mup_model``, which
                                             builds a fresh model: ``mup_base_width`` becomes the base width and both
                                             upstream fields are dropped from the new model's config
``hf_optim_mup`` and ``mup: true``           refused (two muPs claim the model)
==========================================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_KEY = "hf_optim_mup"
LEGACY_KEY = "mup"
UPSTREAM_BASE_WIDTH = "mup_base_width"


def upstream_claim(config: Any) -> bool:
    """Whether ``config`` switches on upstream transformers' muP (``mup`` set to something that is not our dict)."""
    value = getattr(config, LEGACY_KEY, None)
    return bool(value) and not isinstance(value, Mapping)


def _upstream_error(config: Any, what: str) -> ValueError:
    base = getattr(config, UPSTREAM_BASE_WIDTH, None)
    return ValueError(
        f"{what}: config.mup={getattr(config, LEGACY_KEY)!r} (mup_base_width={base!r}) is the muP switch of upstream "
        "transformers (pull request 45848), which changes the model itself (readout, learning-rate split); hf-optim "
        "does not apply its own muP on top of it (two muP surgeries would compound). Either train it with upstream's "
        "muP alone (Trainer: --optim_args mup=false), or build a fresh hf-optim muP model from the config with "
        f"mup_integration.make_mup_model(config) (it adopts mup_base_width={base!r} as the base width and drops the "
        "upstream fields)."
    )


def _base_width_of(plan: Mapping[str, Any], config: Any) -> float | None:
    base = plan.get("base_config") or {}
    width = base.get("hidden_size", base.get("n_embd"))
    if width is None and plan.get("width_mult") and isinstance(getattr(config, "hidden_size", None), int):
        width = config.hidden_size / float(plan["width_mult"])
    return width


def stored_plan_dict(config: Any) -> Mapping[str, Any] | None:
    """The plan dict in ``config`` (``hf_optim_mup``, else an old ``mup`` dict), ``None`` without one.

    Raises a ValueError for the cases the module docstring lists as refused.
    """
    if config is None:
        return None
    new = getattr(config, CONFIG_KEY, None)
    legacy = getattr(config, LEGACY_KEY, None)
    if upstream_claim(config):
        what = "The config carries both an hf-optim muP plan (hf_optim_mup) and" if new else "The config carries"
        raise _upstream_error(config, what + " upstream's muP switch")
    if isinstance(legacy, Mapping) and legacy:
        if new and dict(new) != dict(legacy):
            raise ValueError(
                "The config carries two different muP plans, config.hf_optim_mup and an old config.mup "
                "dict; delete the stale one (config.mup) before loading."
            )
        base = getattr(config, UPSTREAM_BASE_WIDTH, None)
        planned = _base_width_of(legacy, config)
        if base is not None and planned is not None and float(base) != float(planned):
            raise ValueError(
                f"The config carries an old hf-optim muP plan (config.mup, base hidden size {planned:g}) and "
                f"upstream's mup_base_width={base!r}, which disagree: it is not clear which muP the weights were "
                "trained with. Remove mup_base_width if the model was built by hf-optim (make_mup_model)."
            )
        return new or legacy
    return new or None


def store_plan_dict(config: Any, plan: Mapping[str, Any]) -> None:
    """Write ``plan`` as ``config.hf_optim_mup`` and remove an old ``config.mup`` dict (upstream would claim it)."""
    if upstream_claim(config):
        raise _upstream_error(config, "Cannot apply hf-optim muP to this model")
    setattr(config, CONFIG_KEY, dict(plan))
    if isinstance(getattr(config, LEGACY_KEY, None), Mapping):
        delattr(config, LEGACY_KEY)


def clear_plan(config: Any) -> None:
    """Remove every muP field (ours, old and upstream's) from ``config``, e.g. for a derived base config."""
    for key in (CONFIG_KEY, LEGACY_KEY, UPSTREAM_BASE_WIDTH):
        if key in vars(config):
            delattr(config, key)


def adopt_upstream(config: Any, base_width: int | None) -> int | None:
    """For a fresh build: the base width (``mup_base_width`` when ``config`` switches upstream's muP on, checked
    against ``base_width``); removes upstream's fields from ``config`` (a copy the caller owns)."""
    if not upstream_claim(config):
        return base_width
    upstream = getattr(config, UPSTREAM_BASE_WIDTH, None)
    if upstream is None and base_width is None:
        raise ValueError(
            "config.mup is set (upstream transformers' muP switch) but config.mup_base_width is not: "
            "pass base_width= to make_mup_model."
        )
    if upstream is not None and base_width is not None and int(upstream) != int(base_width):
        raise ValueError(
            f"base_width={base_width!r} disagrees with the config's mup_base_width={upstream!r} "
            "(upstream transformers' muP field); pass the same value or remove one."
        )
    clear_plan(config)
    return int(upstream) if upstream is not None else base_width
