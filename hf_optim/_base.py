"""What every optimizer of this package shares: group validation, the peak learning rate, per-parameter overrides.

Per-parameter overrides are how muP (or any other policy) reaches an optimizer without patching it: the caller hands
``param_overrides={param: {"lr_mult": 0.25, "weight_decay_mult": 4.0, ...}}`` and the optimizer splits its groups so
that parameters with equal overrides share a group. The resulting groups hold only plain numbers and strings, so
``state_dict()`` stays loadable with ``torch.load(weights_only=True)`` and nothing is attached to Parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch

from . import _state_loading, precision
from . import _validation as v
from .decay import check_lr_peak, check_weight_decay_mode, resolve_lr_peak, warn_lr_above_peak

#: Keys of ``param_overrides`` that multiply the group's value instead of replacing it.
MULTIPLIER_KEYS: dict[str, str] = {"lr_mult": "lr", "weight_decay_mult": "weight_decay"}

ParamOverrides = Mapping[torch.Tensor, Mapping[str, Any]]
#: ``resolve(name, value, group, defaults)``: the number a group value stands for (e.g. Adafactor's ``"lr"`` sentinel).
Resolver = Callable[[str, Any, Mapping[str, Any], Mapping[str, Any]], Any]


def _as_group_list(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of Tensors or of dicts (parameter groups), got a single Tensor.")
    params = list(params)
    if not params:
        raise ValueError("params is empty: the optimizer got no parameters to optimize.")
    if isinstance(params[0], dict):
        return [dict(group) for group in params]
    return [{"params": params}]


#: The override of a parameter that the optimizer leaves out (a frozen parameter, :mod:`hf_optim.param_rules`).
FROZEN = "frozen"


def apply_param_overrides(
    params: Any, overrides: ParamOverrides | None, defaults: Mapping[str, Any], resolve: Resolver | None = None
) -> list[dict[str, Any]]:
    """Split parameter groups so that parameters with the same overrides share a group.

    ``lr_mult`` and ``weight_decay_mult`` multiply the group's ``lr`` / ``weight_decay`` (falling back to the
    optimizer defaults) and are kept in the group for logging; any other key replaces the group's value.
    ``resolve`` turns a symbolic value into the number it stands for *before* it is multiplied (Adafactor's PaLM
    preset stores ``weight_decay="lr"``, meaning the group's peak lr: ``"lr" * 4.0`` would be a crash). Multipliers
    are applied in sorted key order, so ``lr_mult`` acts before ``weight_decay_mult`` and a weight decay that means
    "the lr" sees the multiplied lr.
    """
    groups = _as_group_list(params)
    if not overrides:
        return groups
    by_id = {id(p): dict(o) for p, o in overrides.items()}
    _check_override_keys(by_id.values(), defaults)
    seen: set[int] = set()
    result: list[dict[str, Any]] = []
    for group in groups:
        group_params = list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in group_params:
            override = by_id.get(id(p), {})
            if override:
                seen.add(id(p))
            if override.get(FROZEN):  # a frozen parameter has no place in the optimizer, hence no state
                continue
            buckets.setdefault(tuple(sorted(override.items())), []).append(p)
        for key, bucket in buckets.items():
            new_group = {**group, "params": bucket}
            for name, value in key:
                if name in MULTIPLIER_KEYS:
                    v.check_non_negative(f"param_overrides[...][{name!r}]", value)
                    target = MULTIPLIER_KEYS[name]
                    # sorted keys: a replaced value ("weight_decay") is set before its multiplier scales it
                    base = new_group.get(target, defaults[target])
                    if resolve is not None:
                        base = resolve(target, base, new_group, defaults)
                    new_group[target] = base * value
                new_group[name] = value
            result.append(new_group)
    missing = [p for p in overrides if id(p) not in seen and overrides[p] and not overrides[p].get(FROZEN)]
    if missing:
        raise ValueError(
            f"param_overrides holds {len(missing)} tensor(s) that are in none of the parameter groups "
            "(frozen or not passed to the optimizer?). Pass overrides only for the parameters being optimized."
        )
    return result


def _check_override_keys(overrides: Iterable[Mapping[str, Any]], defaults: Mapping[str, Any]) -> None:
    """A key that is neither a multiplier nor a knob would be stored in the group and never read (``lr_mul``)."""
    valid = sorted({*MULTIPLIER_KEYS, *defaults, "lr_peak", FROZEN})
    for override in overrides:
        for key in override:
            if key not in valid:
                raise ValueError(
                    f"param_overrides key {key!r} is neither a multiplier ({sorted(MULTIPLIER_KEYS)}) nor a knob of "
                    f"this optimizer ({[k for k in valid if k not in MULTIPLIER_KEYS]}).{v.closest(str(key), valid)}"
                )


def constructor_knobs(init: Callable[..., Any]) -> tuple[str, ...]:
    """The named arguments of an optimizer constructor that are group knobs (all but ``params``/``param_overrides``)."""
    skip = {"self", "params", "param_overrides"}
    return tuple(
        n
        for n, p in inspect.signature(init).parameters.items()
        if n not in skip and p.kind is not inspect.Parameter.VAR_KEYWORD
    )


def group_defaults(init: Callable[..., Any], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The ``defaults`` of an optimizer from its constructor ``init`` called with ``arguments`` (its ``locals()``).

    The signature is the one list of a class's knobs (:meth:`BaseOptimizer.knob_names` reads it too), so a knob
    added to a constructor reaches its groups without a second list to keep in step. ``init`` is the constructor
    whose locals these are, not ``type(self).__init__``: a subclass may take other arguments.
    """
    return {name: arguments[name] for name in constructor_knobs(init)}


class BaseOptimizer(torch.optim.Optimizer):
    """Base class: validates every group (at construction and in ``add_param_group``) and records ``lr_peak``.

    Subclasses list their allowed ``implementation`` values and extend :meth:`_check_group`.
    """

    #: ``implementation`` values the subclass supports, besides ``"auto"``.
    implementations: ClassVar[tuple[str, ...]] = ("for-loop", "foreach")
    #: Foreign state-dict formats :meth:`load_state_dict` translates (names of :data:`hf_optim._interop.FORMATS`).
    interop_formats: ClassVar[tuple[str, ...]] = ()
    #: Whether complex parameters are stepped (as real and imaginary coordinates, like torch); else refused up front.
    supports_complex: ClassVar[bool] = True
    #: Knobs that must stay > 0 in the compute dtype of every parameter of the group (0 divides 0 by 0).
    eps_knobs: ClassVar[tuple[str, ...]] = ()
    #: State keys that are never negative (second moments): quantised with the unsigned codebook, without a zero.
    nonnegative_state: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, param_overrides: ParamOverrides | None = None
    ) -> None:
        groups = apply_param_overrides(params, param_overrides, defaults, resolve=type(self)._resolve_group_value)
        super().__init__(groups, defaults)

    @staticmethod
    def _resolve_group_value(name: str, value: Any, group: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
        """The number a group value stands for; subclasses with symbolic values (Adafactor) override this."""
        return value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``Optimizer.add_param_group``, then validation; a rejected group is removed again before the error
        propagates, so a caught ``ValueError`` leaves the optimizer exactly as it was."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            self._check_group_params(group, group["params"])
            # The learning rate at creation is the peak for `independent`/`corrected` decay; schedulers only scale it
            # (a scheduler that records its own peak, OneCycleLR's `max_lr`, takes over at the next step).
            group.setdefault("lr_peak", group["lr"])
            v.check_non_negative("lr_peak", group["lr_peak"])
            if "weight_decay_mode" in group:
                check_lr_peak(group["weight_decay_mode"], group.get("weight_decay", 0.0), group["lr_peak"])
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        v.check_non_negative("lr", group["lr"])
        if "weight_decay" in group:
            v.check_non_negative("weight_decay", group["weight_decay"])
        if "weight_decay_mode" in group:
            check_weight_decay_mode(group["weight_decay_mode"], group.get("weight_decay", 0.0))
        if "maximize" in group:
            v.check_bool("maximize", group["maximize"])
        if "implementation" in group:
            v.check_choice("implementation", group["implementation"], ("auto", *self.implementations))
        if "state_dtype" in group:
            precision.check_state_format(group)

    def _check_group_params(self, group: dict[str, Any], params: Iterable[torch.Tensor]) -> None:
        """Checks that need the group's tensors: complex support, epsilons representable in each compute dtype."""
        name = type(self).__name__
        for p in params:
            if p.is_complex() and not self.supports_complex:
                raise TypeError(
                    f"{name} does not support complex parameters (got one of dtype {p.dtype}, shape "
                    f"{tuple(p.shape)}); use torch.view_as_real on it or another optimizer."
                )
            # Maths run in fp32 for bf16/fp16/fp32 parameters, fp64 for fp64 (complex: their real dtype).
            compute = precision.real_compute_dtype(p)
            for knob in self.eps_knobs:
                value = group.get(knob)
                if isinstance(value, (int, float)) and value > 0 and torch.tensor(value, dtype=compute).item() == 0:
                    raise ValueError(
                        f"{knob}={value!r} is 0 in {compute} (the compute dtype of a {p.dtype} parameter): a zero "
                        f"gradient would give 0/0 = NaN. Use {knob} >= {torch.finfo(compute).tiny:.3g} (the smallest "
                        f"normal {compute})."
                    )

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """The knobs a group of this class holds (the named constructor arguments)."""
        return constructor_knobs(cls.__init__)

    def _group_template(self, saved: Mapping[str, Any]) -> Mapping[str, Any]:
        """The live group whose knobs a saved group is checked against when its parameters are unknown (``hf-optim
        train --resume`` checks the optimizer family before the model exists); one rule per class: the first group."""
        return self.param_groups[0]

    def _state_specs(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, _state_loading.StateSpec]:
        """The state entries this class keeps for ``p`` in ``group`` (keys, shapes): what loading accepts."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prepare_step()
        for index, group in enumerate(self.param_groups):
            fmt = precision.StateFormat.of(group)
            if fmt.plain:
                self._step_group(index, group)
            else:
                self._step_group_stored(index, group, fmt)
        return loss

    def _step_group_stored(self, index: int, group: dict[str, Any], fmt: precision.StateFormat) -> None:
        """The class's own step on state kept in a stored form (``state_dtype``): each chunk of parameters has its state
        expanded to the compute dtype, stepped, and stored again, so every kernel runs unchanged on ordinary tensors."""
        params = group["params"]
        dtype_for = lambda key, p: self._state_dtype_for(key, p, group)
        try:
            for chunk in precision.expansion_chunks([p for p in params if p.grad is not None]):
                group["params"] = chunk
                for p in chunk:
                    precision.expand_(self.state[p], p, fmt, self.nonnegative_state, dtype_for)
                try:
                    self._step_group(index, group)
                finally:
                    for p in chunk:
                        precision.compress_(self.state[p], p, fmt, self.nonnegative_state)
        finally:
            group["params"] = params

    def _state_dtype_for(self, key: str, p: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        """The dtype the class computes ``state[key]`` of ``p`` in (a stored state is expanded to it)."""
        return precision.state_dtype(p)

    def _stored_state_specs(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, _state_loading.StateSpec]:
        """:meth:`_state_specs` in the stored form of the group's ``state_dtype`` (what a state dict holds)."""
        return precision.stored_specs(self._state_specs(p, group), p, group, self.nonnegative_state)

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        """Update the parameters of ``group`` (the ``index``-th) that have a gradient: the rule of the subclass."""
        raise NotImplementedError

    def _prepare_step(self) -> None:
        """Run first in every ``step``: the peak lr a scheduler recorded, and the warning when the lr exceeds it."""
        warned = self.__dict__.setdefault("_warned_lr_above_peak", set())
        for index, group in enumerate(self.param_groups):
            group["lr_peak"] = resolve_lr_peak(group)
            if index not in warned and warn_lr_above_peak(index, group):
                warned.add(index)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict`` after checking the whole state dict, keeping each state tensor's dtype.

        Checked first (:mod:`hf_optim._state_loading`): the groups' knobs and every state tensor's shape and kind
        against its parameter, so no implementation runs on state of the wrong shape (a ``ValueError`` naming the
        group, the parameter and the likely cause instead). State dicts of the torch/transformers class a class
        reproduces are translated (:mod:`hf_optim._interop`); knobs a saved group lacks keep the live values.

        torch casts floating state to its parameter's dtype on load. Our optimizers keep fp32 state for bf16
        parameters (and bf16 momentum for fp32 ones, in Adafactor), so that cast would round the state and break
        "save, load, continue == uninterrupted". The step counter is left as torch loads it.
        """
        state_dict = _state_loading.prepare(self, state_dict)
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            precision.keep_loaded_dtypes(self.state[p], state_dict["state"].get(saved_id, {}), p.device)
        self._normalize_state_dtypes()
        for group in self.param_groups:  # the normalisation may have expanded a bf16 state: stored form again
            fmt = precision.StateFormat.of(group)
            for p in group["params"]:
                if p in self.state:
                    precision.compress_(self.state[p], p, fmt, self.nonnegative_state)

    def _normalize_state_dtypes(self) -> None:
        """After loading: every state tensor the class keeps (:meth:`_state_specs`) in the dtype it computes it in
        (:meth:`_state_dtype_for`) and on its parameter's device; the loader checked that the saved dtypes are real
        floating-point ones (complex for complex parameters). Stored forms are restored by the caller."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key, spec in self._state_specs(p, group).items():
                    if spec.shape is not None:
                        precision.cast_state_(state, key, self._state_dtype_for(key, p, group), p.device)

    def _params_with_grad(self, group: dict[str, Any]) -> Iterator[torch.Tensor]:
        """Parameters of ``group`` that have a gradient; sparse gradients raise a clear error."""
        for p in group["params"]:
            if p.grad is None:
                continue
            v.check_dense_grad(p.grad, type(self).__name__)
            yield p
