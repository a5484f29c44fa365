"""Property test: random configurations and shapes either train (finite results) or fail with a clear error.

"Clear" means a ``ValueError``/``TypeError`` raised while constructing the optimizer, whose message names the
argument that was wrong; a crash inside ``step()`` or a non-finite parameter is a bug.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer_cases import CASES

MODES = ["l2", "coupled", "independent", "corrected"]
SEARCHED = ("lr", "weight_decay", "weight_decay_mode", "eps", "eps_mode", "betas", "maximize", "implementation")

shape = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
magnitude = st.one_of(st.just(0.0), st.floats(1e-6, 10.0), st.floats(-1.0, -1e-9))
beta = st.one_of(st.floats(0.0, 0.999), st.sampled_from([-0.1, 1.0, 1.5]))


@st.composite
def configurations(draw):
    case = draw(st.sampled_from([c for c in CASES if c.available]))
    accepted = inspect.signature(case.cls.__init__).parameters
    knobs = {
        "lr": draw(magnitude),
        "weight_decay": draw(st.one_of(magnitude, st.floats(0.0, 1e-3))),
        "weight_decay_mode": draw(st.sampled_from([*MODES, "l3"])),
        "eps": draw(st.one_of(st.floats(1e-12, 1e-2), st.floats(-1.0, -1e-12))),
        "eps_mode": draw(st.sampled_from(["torch", "tf", "keras"])),
        "betas": (draw(beta), draw(beta)),
        "maximize": draw(st.booleans()),
        "implementation": draw(st.sampled_from(["auto", *case.cls.implementations, "fastest"])),
    }
    chosen = draw(st.lists(st.sampled_from(SEARCHED), unique=True, max_size=len(SEARCHED)))
    overrides = {k: knobs[k] for k in chosen if k in accepted}
    shapes = draw(st.lists(shape, min_size=1, max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return case, overrides, shapes, dtype


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations(), st.integers(0, 2**16))
def test_random_configurations_train_or_fail_clearly(config, seed):
    case, overrides, shapes, dtype = config
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. the independent-decay magnitude warning
        try:
            opt = case.build(params, **overrides)
        except (ValueError, TypeError) as error:
            assert any(name in str(error) for name in overrides), f"{error} does not name one of {list(overrides)}"
            return
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
    for p in params:
        assert torch.isfinite(p).all(), (case.id, overrides, shapes, dtype)


def test_fuzz_table_has_rows():
    if not any(c.available for c in CASES):
        pytest.fail("no optimizer of the central table is importable")
