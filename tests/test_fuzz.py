"""Property test: random configurations and shapes either train (finite results) or fail with a clear error.

Every knob of every optimizer is fuzzed with values of the right type (floats for numbers, bools for flags, strings
for choices), drawn from the knob's valid domain or, sometimes, from just outside it. "Clear" means a ``ValueError``
raised while constructing the optimizer whose message names one of the knobs drawn invalid (or, for a combination
rule such as ``nesterov`` needing momentum, the knob that states the rule). A ``TypeError``, a crash inside
``step()`` or a non-finite parameter is a bug.

Adafactor takes ``**knobs``: its knob names and their types come from ``KNOBS`` / ``PRESETS`` (a choice knob's valid
values are those the presets use), and :data:`ADAFACTOR_NUMBERS` gives the numeric domains; a knob missing from both
fails :func:`test_every_adafactor_knob_is_fuzzed`. ``min_dim_size_to_factor`` is drawn small (1-3), so the small
fuzzed shapes are factored. ``implementation="compiled"`` is left out: each new shape costs seconds of compilation,
and test_compiled.py checks it against the for-loop.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hf_optim
from hf_optim.decay import WEIGHT_DECAY_MODES
from hf_optim.optim.adafactor.presets import KNOBS, PRESETS

#: (valid values, invalid values or None): both strategies draw values of the knob's type.
Domain = tuple[st.SearchStrategy, "st.SearchStrategy | None"]


def floats(lo: float, hi: float) -> st.SearchStrategy:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


NEGATIVE = st.one_of(floats(-1.0, -1e-9), st.just(-math.inf))
UNIT = floats(0.0, 0.999)  # [0, 1)
OUTSIDE_UNIT = st.one_of(floats(-1.0, -1e-9), floats(1.0, 2.0))


def choice(valid: list[str]) -> Domain:
    return st.sampled_from(valid), st.sampled_from(["no-such-choice", valid[0].upper()])


def common(cls: type) -> dict[str, Domain]:
    impls = ["auto", *(i for i in cls.implementations if i != "compiled")]
    return {
        "lr": (st.one_of(st.just(0.0), floats(1e-6, 1.0)), NEGATIVE),
        "weight_decay": (st.one_of(st.just(0.0), floats(1e-6, 0.1)), NEGATIVE),
        "weight_decay_mode": choice(list(WEIGHT_DECAY_MODES)),
        "maximize": (st.booleans(), None),
        "implementation": choice(impls),
        **STATE_FORMAT,
    }


#: How state is stored between steps (every optimizer): small blocks and no threshold, so the fuzzed tensors are
#: quantised too.
STATE_FORMAT: dict[str, Domain] = {
    "state_dtype": choice(["float32", "bfloat16", "int8", "int4"]),
    "state_block_size": (st.sampled_from([2, 4, 8]), st.integers(-2, 1)),
    "state_min_numel": (st.integers(1, 8), st.integers(-2, 0)),
    "param_update": choice(["nearest", "stochastic", "kahan"]),
}


BETAS: Domain = (
    st.tuples(UNIT, UNIT),
    st.one_of(st.tuples(OUTSIDE_UNIT, UNIT), st.tuples(UNIT, OUTSIDE_UNIT)),
)
EPS: Domain = (st.one_of(st.just(0.0), floats(1e-12, 1e-2)), NEGATIVE)

DOMAINS: dict[str, Callable[[], dict[str, Domain]]] = {
    "Adam": lambda: {**common(hf_optim.Adam), "betas": BETAS, "eps": EPS, "eps_mode": choice(["torch", "tf"])},
    "AdamW": lambda: {**common(hf_optim.AdamW), "betas": BETAS, "eps": EPS, "eps_mode": choice(["torch", "tf"])},
    "RAdam": lambda: {**common(hf_optim.RAdam), "betas": BETAS, "eps": EPS, "eps_mode": choice(["torch", "tf"])},
    "AdamAtan2": lambda: {
        **common(hf_optim.AdamAtan2),
        "betas": BETAS,
        "a": (floats(1e-3, 3.0), st.one_of(st.just(0.0), NEGATIVE)),
        "b": (st.one_of(st.just(0.0), floats(1e-3, 3.0)), NEGATIVE),
    },
    "SGDW": lambda: {
        **common(hf_optim.SGDW),
        "momentum": (st.one_of(st.just(0.0), floats(0.0, 0.99)), NEGATIVE),
        "dampening": (floats(0.0, 1.0), st.one_of(NEGATIVE, floats(1.001, 2.0))),
        "nesterov": (st.booleans(), None),
    },
    "AdaGrad": lambda: {
        **common(hf_optim.AdaGrad),
        "lr_decay": (floats(0.0, 1.0), NEGATIVE),
        "initial_accumulator_value": (floats(0.0, 1.0), NEGATIVE),
        "eps": EPS,
    },
    "RMSProp": lambda: {
        **common(hf_optim.RMSProp),
        "alpha": (UNIT, OUTSIDE_UNIT),
        "eps": EPS,
        "momentum": (floats(0.0, 0.99), NEGATIVE),
        "centered": (st.booleans(), None),
    },
    "Adafactor": lambda: adafactor_domains(),
    "Muon": lambda: {
        **{k: v for k, v in common(hf_optim.Muon).items() if k != "maximize"},  # Muon has no maximize
        "momentum": (UNIT, OUTSIDE_UNIT),
        "nesterov": (st.booleans(), None),
        "ns_steps": (st.integers(1, 8), st.integers(-3, 0)),
        "ns_coefficients": (st.tuples(floats(-5.0, 5.0), floats(-5.0, 5.0), floats(-5.0, 5.0)), st.just((1.0, 2.0))),
        "ns_dtype": choice(["bfloat16", "float32", "float64"]),
        "orthogonalize": choice(["newton_schulz", "svd"]),
        "eps": (floats(1e-9, 1e-3), st.one_of(NEGATIVE, st.just(0.0))),
        "adjust": choice(["original", "rms", "spectral"]),
        "fallback": choice(["adamw_v2", "adafactor_v2", "sgdw_v2"]),
        "fallback_lr": (st.one_of(st.none(), floats(1e-6, 1.0)), NEGATIVE),
        "fallback_betas": BETAS,
        "fallback_eps": EPS,
        "rule": choice(["auto", "fallback", "muon"]),
        # a positive tau needs a model with attached recorders (tests/test_qk_clip.py); here only "off" is valid
        "qk_clip": (st.none(), st.one_of(NEGATIVE, st.just(0.0))),
    },
}

#: Numeric Adafactor knobs: (valid, invalid). ``None`` is a valid value where the knob documents it.
ADAFACTOR_NUMBERS: dict[str, Domain] = {
    "lr": (st.one_of(st.just(0.0), floats(1e-6, 1.0)), NEGATIVE),
    "min_dim_size_to_factor": (st.integers(1, 3), st.integers(-2, 0)),
    "beta1": (st.one_of(st.none(), UNIT), OUTSIDE_UNIT),
    "decay_rate": (floats(0.05, 1.5), st.one_of(st.just(0.0), NEGATIVE)),
    "beta2_cap": (st.one_of(st.none(), floats(0.01, 1.0)), st.one_of(st.just(0.0), NEGATIVE, floats(1.001, 2.0))),
    "eps1": (st.one_of(st.none(), floats(1e-30, 1e-3)), st.one_of(st.just(0.0), NEGATIVE)),
    "eps2": (st.one_of(st.just(0.0), floats(1e-6, 1e-2)), NEGATIVE),
    "clip_threshold": (st.one_of(st.none(), floats(0.1, 2.0)), st.one_of(st.just(0.0), NEGATIVE)),
    "rho_max": (floats(1e-3, 1.0), st.one_of(st.just(0.0), NEGATIVE)),
    "weight_decay": (st.one_of(st.just(0.0), floats(1e-6, 0.1), st.just("lr")), NEGATIVE),
    "state_block_size": STATE_FORMAT["state_block_size"],
    "state_min_numel": STATE_FORMAT["state_min_numel"],
}
#: Values a choice knob takes besides those the presets use.
ADAFACTOR_EXTRA_CHOICES: dict[str, list[str]] = {
    "weight_decay_mode": list(WEIGHT_DECAY_MODES),
    "implementation": [i for i in hf_optim.Adafactor.implementations if i != "compiled"],
    "momentum_dtype": ["fp32", "bf16"],
    "state_dtype": ["bfloat16", "int8", "int4"],
    "param_update": ["stochastic", "kahan"],
}


def adafactor_domains() -> dict[str, Domain]:
    domains: dict[str, Domain] = {"preset": choice(sorted(PRESETS))}
    for knob in KNOBS:
        values = [preset[knob] for preset in PRESETS.values()]
        if knob in ADAFACTOR_NUMBERS:
            domains[knob] = ADAFACTOR_NUMBERS[knob]
        elif all(isinstance(value, bool) for value in values):
            domains[knob] = (st.booleans(), None)
        elif all(isinstance(value, str) for value in values):
            domains[knob] = choice(sorted({*values, *ADAFACTOR_EXTRA_CHOICES.get(knob, [])}))
    return domains


#: Knobs that state a rule about a combination: their error may fire even when every single value is valid.
COMBINATION_RULES = {
    "SGDW": {"nesterov"},
    "Adafactor": {"warmup_init", "eps1_mode", "stochastic_rounding"},  # + param_update: one write-back rule
    "RMSProp": {"centered"},  # also refuses a stored (bf16 / quantised) state
    "Muon": {"rule", "ns_coefficients"},  # rule="muon" on a 0-/1-D tensor; a quintic that diverges in ns_steps steps
}
# (eps1_mode="clamp" refuses an eps1 whose square underflows in float32, e.g. the adafactor_v2 preset's 1e-30.)


@st.composite
def configurations(draw):
    cls_name = draw(st.sampled_from(sorted(DOMAINS)))
    domains = DOMAINS[cls_name]()
    chosen = draw(st.lists(st.sampled_from(sorted(domains)), unique=True, max_size=len(domains)))
    knobs: dict[str, Any] = {}
    invalid: set[str] = set()
    for name in chosen:
        valid, bad = domains[name]
        if bad is not None and draw(st.integers(0, 9)) == 0:  # ~10% of knobs outside their domain
            knobs[name] = draw(bad)
            invalid.add(name)
        else:
            knobs[name] = draw(valid)
    if cls_name == "Adafactor":
        knobs.setdefault("min_dim_size_to_factor", 2)  # the presets' 128 would never factor these shapes
    shape = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    shapes = draw(st.lists(shape, min_size=1, max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return cls_name, knobs, invalid, shapes, dtype


def names_in(message: str, names: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(name)}\b", message) for name in names)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations(), st.integers(0, 2**16))
def test_random_configurations_train_or_fail_clearly(config, seed):
    cls_name, knobs, invalid, shapes, dtype = config
    cls = getattr(hf_optim, cls_name)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in shapes]
    rules = COMBINATION_RULES.get(cls_name, set()) & set(knobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. the independent-decay magnitude warning
        try:
            opt = cls(params, **knobs)
        except ValueError as error:
            assert names_in(str(error), invalid | rules), (
                f"{error!s} names none of the invalid knobs {sorted(invalid)} (combination rules: {sorted(rules)})"
            )
            return
        assert not invalid, f"{cls_name} accepted invalid { ({k: knobs[k] for k in invalid}) }"
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
    for p in params:
        assert torch.isfinite(p).all(), (cls_name, knobs, shapes, dtype)


def test_every_adafactor_knob_is_fuzzed():
    """A knob added to the presets without a fuzzing domain fails here."""
    assert set(KNOBS) <= set(adafactor_domains()), sorted(set(KNOBS) - set(adafactor_domains()))


def test_every_optimizer_is_fuzzed():
    public = {
        name
        for name in hf_optim.__all__
        if isinstance(getattr(hf_optim, name, None), type)
        and issubclass(getattr(hf_optim, name), torch.optim.Optimizer)
    }
    assert public == set(DOMAINS)


@pytest.mark.parametrize("cls_name", sorted(DOMAINS))
def test_every_constructor_argument_is_fuzzed(cls_name: str):
    """Named constructor arguments (besides params and param_overrides) all have a domain."""
    import inspect

    cls = getattr(hf_optim, cls_name)
    named = {
        n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD
    } - {"self", "params", "param_overrides"}
    assert named <= set(DOMAINS[cls_name]()), sorted(named - set(DOMAINS[cls_name]()))


MUTATIONS = ("permute_params", "swap_entries", "reshape", "add_dim", "rename_key", "retype", "permute_model")


@st.composite
def loading_cases(draw):
    cls_name = draw(st.sampled_from(sorted(DOMAINS)))
    shape = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
    shapes = draw(st.lists(shape, min_size=2, max_size=4))
    implementation = draw(
        st.sampled_from(["auto", *(i for i in getattr(hf_optim, cls_name).implementations if i != "compiled")])
    )
    return cls_name, shapes, implementation, draw(st.sampled_from(MUTATIONS)), draw(st.integers(0, 2**16))


def _mutated(saved: dict, mutation: str, rng: torch.Generator) -> dict:
    """``saved`` with its parameter ids permuted, or its state tensors swapped, reshaped, renamed or retyped."""
    ids = saved["param_groups"][0]["params"]
    entries = [saved["state"][i] for i in ids if i in saved["state"]]
    tensors = [(e, k) for e in entries for k, v in e.items() if torch.is_tensor(v) and v.dim() > 0]
    pick = lambda n: int(torch.randint(n, (1,), generator=rng))
    if mutation == "permute_params":
        saved["param_groups"][0]["params"] = [ids[i] for i in torch.randperm(len(ids), generator=rng).tolist()]
    elif mutation == "swap_entries" and len(entries) >= 2:
        a, b = ids[0], ids[-1]
        saved["state"][a], saved["state"][b] = saved["state"].get(b, {}), saved["state"].get(a, {})
    elif mutation in ("reshape", "add_dim") and tensors:
        entry, key = tensors[pick(len(tensors))]
        value = entry[key]
        entry[key] = (
            value.reshape(-1)
            if mutation == "reshape" and value.dim() > 1
            else value.reshape(tuple(reversed(value.shape)))
            if mutation == "reshape"
            else value.unsqueeze(0)
        )
    elif mutation == "rename_key" and tensors:
        entry, key = tensors[pick(len(tensors))]
        other = [
            k for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "sum", "momentum_buffer", "row_var") if k != key
        ]
        entry[other[pick(len(other))]] = entry.pop(key)
    elif mutation == "retype" and tensors:
        entry, key = tensors[pick(len(tensors))]
        entry[key] = entry[key].to((torch.float64, torch.int32, torch.complex64, torch.bfloat16)[pick(4)])
    return saved


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loading_cases())
def test_load_state_dict_with_permuted_or_reshaped_state_raises_only_value_error(case):
    """Loading a permuted, reshaped, renamed or retyped state dict either raises ValueError (leaving the optimizer
    empty) or loads state that steps to finite parameters: never another exception, never a crash in a kernel."""
    import copy

    cls_name, shapes, implementation, mutation, seed = case
    cls = getattr(hf_optim, cls_name)
    knobs = {"min_dim_size_to_factor": 1} if cls_name == "Adafactor" else {}
    rng = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=rng).requires_grad_(True) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        source = cls(params, implementation=implementation, **knobs)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=rng)
            source.step()
        saved = _mutated(copy.deepcopy(source.state_dict()), mutation, rng)
        targets = [torch.randn(s, generator=rng).requires_grad_(True) for s in shapes]
        if mutation == "permute_model":
            targets = targets[::-1]
        target = cls(targets, implementation=implementation, **knobs)
        try:
            target.load_state_dict(saved)
        except ValueError:
            assert not target.state
            event(f"{mutation}: refused")
            return
        event(f"{mutation}: loaded")
        for p in targets:
            p.grad = torch.randn(p.shape, generator=rng)
        target.step()
    for p in targets:
        assert torch.isfinite(p).all(), (cls_name, shapes, mutation)
