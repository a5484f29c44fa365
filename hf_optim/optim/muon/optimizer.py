r"""Muon for the hidden matrices and a fallback optimizer (AdamW by default) for everything else, in one object."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from mup_integration.vocabulary import HIDDEN

from ... import _validation as v
from ... import precision
from ..._base import BaseOptimizer, ParamOverrides, group_defaults
from ..._state_loading import StateSpec, like
from ...decay import decay_rate, l2_coefficient
from . import orthogonalize as ortho
from . import qk_clip

#: Values of a group's ``rule``: ``auto`` sends tensors with >= 2 dimensions to Muon and the rest to the fallback.
RULES = ("auto", "muon", "fallback")
MUON, FALLBACK = "muon", "fallback"


class Muon(BaseOptimizer):
    r"""Muon (Jordan et al. 2024) on matrices, with a fallback optimizer for the other parameters.

    For a parameter routed to Muon (group ``rule="muon"``), with lr :math:`\alpha_t`, momentum :math:`\mu`:

    .. math::
       \begin{aligned}
       &g_t \leftarrow \nabla f_t(x_{t-1}) \; (+\lambda x_{t-1} \text{ if mode} = \texttt{l2}) \\
       &B_t \leftarrow \mu B_{t-1} + (1-\mu) g_t \qquad (B_0 = 0) \\
       &D_t \leftarrow \mu B_t + (1-\mu) g_t \text{ if nesterov else } B_t \\
       &O_t \leftarrow \mathrm{orth}(D_t) \approx U V^\top \text{ per matrix (Newton-Schulz, or exact SVD)} \\
       &x_t \leftarrow x_{t-1}(1 - r_t) - \alpha_t \, s(A, B) \, O_t
       \end{aligned}

    with :math:`r_t` the decay of ``weight_decay_mode`` at the *unscaled* lr (``coupled``: :math:`\alpha_t\lambda`,
    torch.optim.Muon's decay) and :math:`s(A, B)` the ``adjust`` factor of an :math:`A\times B` matrix
    (:func:`hf_optim.optim.muon.orthogonalize.lr_scale`: ``original``, ``rms`` = Moonlight's 0.2·sqrt(max(A, B)),
    ``spectral`` = sqrt(fan_out/fan_in)). The momentum is the exponential average torch.optim.Muon keeps
    (``lerp``), so with ``adjust="original"`` / ``"rms"`` this is torch's ``Muon`` with ``adjust_lr_fn=None`` /
    ``"match_rms_adamw"``.
    3-D parameters (stacked experts) are orthogonalised per matrix along dim 0; 4-D and up as ``(out, in·kernel)``.

    Parameters of groups with ``rule="fallback"`` (and 0-/1-D ones under ``rule="auto"``) are stepped by the
    registered optimizer ``fallback`` (``adamw_v2`` by default, ``adafactor_v2`` or any other), built inside this
    object: its groups are groups of this optimizer, its state lives in this optimizer's ``state``, so
    ``state_dict()`` holds both and the Trainer checkpoints and resumes them as one. The fallback's lr is
    ``fallback_lr`` (default: ``lr``; with ``adjust="rms"`` one lr fits both) times the group's multipliers, and it
    follows the scheduler with every other group. :func:`hf_optim.create_optimizer` routes a model's parameters:
    embeddings, the output layer and vectors to the fallback, hidden matrices to Muon (:func:`route`).

    Args:
        params: parameters or parameter groups (a group may set ``rule``).
        lr: learning rate (peak; a scheduler scales it).
        momentum: μ in [0, 1).
        nesterov: Nesterov momentum (torch.optim.Muon's default, True).
        ns_steps: Newton-Schulz iterations (>= 1, < 100).
        ns_coefficients: the quintic's (a, b, c).
        ns_dtype: ``"bfloat16"`` (default, as torch), ``"float32"`` or ``"float64"``: the iteration's dtype.
        orthogonalize: ``"newton_schulz"`` or ``"svd"`` (the exact :math:`UV^\top`, a reference for tests).
        eps: the floor of the Frobenius norm the update is divided by before the iteration.
        adjust: ``"original"`` (default), ``"rms"`` or ``"spectral"``.
        weight_decay: λ >= 0 (torch.optim.Muon's default 0.1); ``weight_decay_mode``: see :mod:`hf_optim.decay`.
        fallback: registered name of the optimizer of the fallback groups; ``fallback_lr``, ``fallback_betas``,
            ``fallback_eps``: its lr and, where it takes them, its betas and epsilon.
        rule: the default ``rule`` of groups that set none.
        qk_clip: τ > 0 of MuonClip (:mod:`hf_optim.qk_clip`): after each step, the query/key weights of every
            attention head whose logit exceeded τ are scaled back to τ. Needs the model's recorder
            (``hf_optim.optim.muon.qk_clip.attach(model)`` before construction; the factory does it). None: off.
        state_dtype, state_block_size, state_min_numel, param_update: how the momentum (and the fallback's state) is
            kept between steps and how bf16 weights are written back, as for every optimizer (:mod:`hf_optim.precision`,
            docs/memory.md).
        param_overrides: per-parameter ``lr_mult`` / ``weight_decay_mult`` / replacements, ``rule`` included.

    References:
        Jordan et al. (2024), *Muon: An optimizer for hidden layers in neural networks*.
        Liu et al. (2025), *Muon is Scalable for LLM Training*, arXiv 2502.16982.
    """

    supports_complex: ClassVar[bool] = False
    #: torch.optim.Muon groups, and torch.optim.AdamW groups for the fallback (see :func:`from_torch_state_dicts`).
    interop_formats: ClassVar[tuple[str, ...]] = ("torch.optim.Muon", "torch.optim.Adam/AdamW")
    implementations: ClassVar[tuple[str, ...]] = ("for-loop",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = ortho.NS_COEFFICIENTS,
        ns_dtype: str = "bfloat16",
        orthogonalize: str = "newton_schulz",
        eps: float = 1e-7,
        adjust: str = "original",
        weight_decay: float = 0.1,
        weight_decay_mode: str = "coupled",
        fallback: str = "adamw_v2",
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] = (0.9, 0.95),
        fallback_eps: float = 1e-8,
        rule: str = "auto",
        qk_clip: float | None = None,
        implementation: str = "auto",
        state_dtype: str = "float32",
        state_block_size: int = 256,
        state_min_numel: int = 4096,
        param_update: str = "nearest",
        param_overrides: ParamOverrides | None = None,
    ) -> None:
        knobs = group_defaults(Muon.__init__, locals())
        knobs["ns_coefficients"] = tuple(knobs["ns_coefficients"])
        knobs["fallback_betas"] = tuple(knobs["fallback_betas"])
        self._fallback: torch.optim.Optimizer | None = None
        super().__init__(params, knobs, param_overrides=param_overrides)
        self._build_fallback()
        # the fallback's second moments, quantised like its own (Muon's momentum is signed)
        self.nonnegative_state = getattr(self._fallback, "nonnegative_state", ())
        self._qk_clip = self._find_qk_clip(qk_clip)

    # --- groups ----------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group with ``rule="auto"`` becomes up to two groups: its matrices (Muon) and the rest (fallback)."""
        rule = param_group.get("rule", self.defaults["rule"])
        v.check_choice("rule", rule, RULES)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if rule != "auto":
            parts = [(rule, params)]
        else:
            parts = [(MUON, [p for p in params if p.dim() >= 2]), (FALLBACK, [p for p in params if p.dim() < 2])]
            parts = [(r, ps) for r, ps in parts if ps] or [(MUON, params)]
        for part_rule, part in parts:
            super().add_param_group({**param_group, "params": part, "rule": part_rule})
            if part_rule == FALLBACK and self._fallback is not None:
                self._adopt(len(self.param_groups) - 1)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group.get("rule") == FALLBACK and "ns_steps" not in group and self._fallback is not None:
            self._fallback._check_group(group)  # a group the fallback adopted (e.g. of a loaded state dict)
            return
        v.check_choice("rule", group["rule"], RULES)
        v.check_positive("qk_clip", group["qk_clip"], allow_none=True)
        v.check_number("momentum", group["momentum"])
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}.")
        v.check_bool("nesterov", group["nesterov"])
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"ns_steps must be an integer in [1, 100), got {steps!r}.")
        coefficients = group["ns_coefficients"]
        if not (isinstance(coefficients, (tuple, list)) and len(coefficients) == 3):
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {coefficients!r}.")
        for value in coefficients:
            v.check_number("ns_coefficients", value)
        gain = ortho.iterated_gain(tuple(coefficients), steps)
        if not gain <= ortho.NS_MAX_GAIN:
            raise ValueError(
                f"ns_coefficients={tuple(coefficients)!r} with ns_steps={steps} make the Newton-Schulz iteration "
                f"diverge: a singular value in (0, 1] can grow to {gain:.3g} (more than {ortho.NS_MAX_GAIN:g}), which "
                "ends in inf / nan weights. Use the default (3.4445, -4.775, 2.0315) or coefficients whose quintic "
                "a*s + b*s^3 + c*s^5 maps [0, 1] into a bounded range."
            )
        v.check_choice("ns_dtype", group["ns_dtype"], tuple(ortho.NS_DTYPES))
        v.check_choice("orthogonalize", group["orthogonalize"], ortho.METHODS)
        v.check_positive("eps", group["eps"])
        v.check_choice("adjust", group["adjust"], ortho.ADJUSTMENTS)
        v.check_positive("fallback_lr", group["fallback_lr"], allow_none=True)
        v.check_betas("fallback_betas", group["fallback_betas"])
        v.check_non_negative("fallback_eps", group["fallback_eps"])
        from ...registry import get_spec

        try:
            spec = get_spec(group["fallback"])
        except ValueError as error:
            raise ValueError(f"fallback={group['fallback']!r}: {error}") from None
        if spec.resolve() is Muon:
            raise ValueError(f"fallback={group['fallback']!r} is Muon itself; choose an element-wise optimizer.")

    def _check_group_params(self, group: dict[str, Any], params: Iterable[torch.Tensor]) -> None:
        super()._check_group_params(group, params)
        if group.get("rule") != MUON:
            return
        for p in params:
            if p.dim() < 2:
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} is routed to Muon (rule='muon'), but Muon orthogonalises "
                    "matrices (2-D, or 3-D stacks of them). Route it to the fallback (rule='fallback', or "
                    "rule='auto', which does so for every tensor with fewer than 2 dimensions)."
                )

    def _fallback_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """A fallback group's settings: this group's lr (times fallback_lr / lr), decay and multipliers, plus the
        knobs the fallback class takes."""
        from ...registry import get_spec

        spec = get_spec(self.defaults["fallback"])  # one fallback class per Muon object (the one _build_fallback made)
        ratio = self._fallback_ratio()
        own = set(spec.knobs())
        settings: dict[str, Any] = {
            k: value for k, value in group.items() if k in own or k in ("params", "lr_mult", "weight_decay_mult")
        }
        settings.update(lr=group["lr"] * ratio, rule=FALLBACK)
        settings.pop("lr_peak", None)
        if spec.takes_betas:
            settings["betas"] = group["fallback_betas"]
        if spec.takes_eps:
            settings["eps"] = group["fallback_eps"]
        return settings

    def _fallback_ratio(self) -> float:
        """fallback_lr / lr: the fallback groups' lr relative to the Muon groups' (1 without fallback_lr)."""
        fallback_lr, lr = self.defaults["fallback_lr"], self.defaults["lr"]
        return 1.0 if fallback_lr is None or not lr else fallback_lr / lr

    def _build_fallback(self) -> None:
        """Build the fallback optimizer on the fallback groups, then make its group dicts *be* this optimizer's."""
        from ...registry import get_spec

        indices = [i for i, g in enumerate(self.param_groups) if g["rule"] == FALLBACK]
        cls = get_spec(self.defaults["fallback"]).resolve()
        ratio = self._fallback_ratio()
        stand_in = torch.nn.Parameter(torch.zeros(1))
        groups = [self._fallback_group(self.param_groups[i]) for i in indices] or [{"params": [stand_in]}]
        self._fallback = cls(groups, lr=self.defaults["lr"] * ratio)
        if not indices:
            self._fallback.param_groups.clear()
        for i, adopted in zip(indices, self._fallback.param_groups):
            self.param_groups[i] = adopted
        self._fallback.state = self.state

    def _adopt(self, index: int) -> None:
        """A fallback group added after construction: the fallback validates and keeps it."""
        self._fallback.add_param_group(self._fallback_group(self.param_groups[index]))
        self.param_groups[index] = self._fallback.param_groups[-1]

    def _relink(self) -> None:
        """After ``load_state_dict`` replaced the group dicts and the state: the fallback sees them again."""
        self._fallback.param_groups = [g for g in self.param_groups if g["rule"] == FALLBACK]
        self._fallback.state = self.state

    # --- state ------------------------------------------------------------------------------------------------------
    def _state_specs(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, StateSpec]:
        if group.get("rule") == FALLBACK:
            return self._fallback._state_specs(p, group)
        return {"momentum_buffer": like(p, required=True)}

    def _state_dtype_for(self, key: str, p: torch.Tensor, group: Mapping[str, Any]) -> torch.dtype:
        if group.get("rule") == FALLBACK and hasattr(self._fallback, "_state_dtype_for"):
            return self._fallback._state_dtype_for(key, p, group)
        return super()._state_dtype_for(key, p, group)

    def _group_template(self, saved: Mapping[str, Any]) -> Mapping[str, Any]:
        """A saved fallback group is checked against the fallback's knobs, a Muon group against Muon's."""
        if saved.get("rule") == FALLBACK:
            return {**self._fallback.defaults, "rule": FALLBACK}
        return {**self.defaults, "rule": MUON}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._relink()

    def _normalize_state_dtypes(self) -> None:
        self._relink()
        super()._normalize_state_dtypes()  # the fallback's groups too: _state_specs and _state_dtype_for delegate

    def _find_qk_clip(self, tau: float | None) -> qk_clip.QKClip | None:
        """The recorder of the model these parameters belong to (None if off, or not attached: the first step says so;
        stand-in constructions that only check the knobs have no model)."""
        if tau is None:
            return None
        return qk_clip.find(p for group in self.param_groups for p in group["params"])

    def _require_qk_clip(self) -> qk_clip.QKClip:
        if self._qk_clip is None:
            self._qk_clip = self._find_qk_clip(self.defaults["qk_clip"])
        if self._qk_clip is None:
            raise ValueError(
                f"qk_clip={self.defaults['qk_clip']!r} needs the attention of the model these parameters belong to: "
                "build the optimizer with hf_optim.create_optimizer(name, model, ...) (or the Trainer / hf-optim "
                "train), or call hf_optim.optim.muon.qk_clip.attach(model) first, with every q_proj / k_proj weight among the "
                "parameters."
            )
        return self._qk_clip

    # --- step -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of every group, then MuonClip's rescaling of the heads whose logits exceeded ``qk_clip``."""
        recorder = self._require_qk_clip() if self.defaults["qk_clip"] is not None else None  # before any update
        loss = super().step(closure)
        if recorder is not None:
            recorder.clip(self.defaults["qk_clip"])
        return loss

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        if group["rule"] == FALLBACK:
            position = next(i for i, g in enumerate(self._fallback.param_groups) if g is group)
            self._fallback._step_group(position, group)
            return
        lr, mode, wd = group["lr"], group["weight_decay_mode"], group["weight_decay"]
        rate = decay_rate(mode, wd, lr, group["lr_peak"])
        l2 = l2_coefficient(mode, wd)
        dtype = ortho.NS_DTYPES[group["ns_dtype"]]
        momentum = group["momentum"]
        for p in self._params_with_grad(group):
            state = self.state[p]
            work = precision.work_copy(p, state, precision.param_update_mode(group))
            grad = p.grad.to(work.dtype)
            if l2:
                grad = grad + l2 * work
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(work, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1.0 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            update = _orthogonalize_whole(
                update,
                method=group["orthogonalize"],
                steps=group["ns_steps"],
                coefficients=tuple(group["ns_coefficients"]),
                eps=group["eps"],
                dtype=dtype,
            )
            if rate:
                work.mul_(1.0 - rate)
            work.add_(update, alpha=-lr * ortho.lr_scale(group["adjust"], p.shape))
            precision.write_back_([p], [work], mode=precision.param_update_mode(group), states=[state])


def _orthogonalize_whole(update: torch.Tensor, **options: Any) -> torch.Tensor:
    """:func:`hf_optim.optim.muon.orthogonalize.orthogonalize` of the whole matrix, also when ``update`` is an FSDP2
    shard.

    A DTensor (FSDP2's sharded parameter) is all-gathered (``full_tensor``), every rank orthogonalises the whole
    matrix (the same numbers everywhere, since the gathered input is the same), and each keeps its own shard
    (``distribute_tensor(..., src_data_rank=None)``: a local slice, no second communication). Cost per step: one
    all-gather of each Muon matrix's update (the parameter's size, like FSDP2's forward gather) and the full
    Newton-Schulz FLOPs on every rank; an all-to-all giving each rank whole matrices (Dion, torchtitan) would split
    that compute but is not done here.
    """
    if type(update).__name__ != "DTensor":
        return ortho.orthogonalize(update, **options)
    from torch.distributed.tensor import distribute_tensor

    whole = ortho.orthogonalize(update.full_tensor(), **options)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


def from_torch_state_dicts(muon: Mapping[str, Any], adamw: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One state dict for :class:`Muon` from the usual torch pair: ``torch.optim.Muon`` on the hidden matrices and
    ``torch.optim.AdamW`` on the rest. Load it into a Muon built with the same parameters in the same order, Muon
    groups first (``Muon([{"params": matrices, "rule": "muon"}, {"params": rest, "rule": "fallback"}], ...)``);
    momentum buffers and Adam moments continue as they were, and each group keeps its saved lr and decay."""
    groups = [dict(g) for g in muon["param_groups"]]
    state = dict(muon["state"])
    if adamw is not None:
        offset = sum(len(g["params"]) for g in groups)
        groups += [{**g, "params": [i + offset for i in g["params"]]} for g in adamw["param_groups"]]
        state.update({i + offset: entry for i, entry in adamw["state"].items()})
    return {"state": state, "param_groups": groups}


def route(
    model: torch.nn.Module, kinds: Mapping[torch.Tensor, str] | None = None
) -> dict[torch.Tensor, dict[str, Any]]:
    """``{param: {"rule": "muon" | "fallback"}}`` for a model: Muon for the hidden matrices, the fallback for the rest.

    With ``kinds`` (the muP plan's, passed by the factory when muP applies) the plan decides: its ``hidden`` kind
    goes to Muon, embeddings, readouts (the output layer, an MoE router's gate) and vectors to the fallback. Without
    a plan: the input embeddings (every ``nn.Embedding``), the output layer (``get_output_embeddings()``, tied or
    not) and every tensor with fewer than 2 dimensions go to the fallback, every other matrix to Muon (so an MoE
    gate, a readout to muP, is Muon's unless a rule routes it: ``{match: mlp\\.gate\\., optimizer: fallback}``).

    HF's GPT-2 ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``: Muon's direction is the same
    either way, but ``adjust="original"``/``"spectral"`` read (rows, columns) as (fan_out, fan_in).
    """
    outside = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and getattr(head, "weight", None) is not None:
        outside.add(id(head.weight))
    kinds = kinds or {}

    def to_muon(p: torch.Tensor) -> bool:
        if p in kinds:  # the plan knows what the tensor is
            return kinds[p] == HIDDEN
        return p.dim() >= 2 and id(p) not in outside

    return {p: {"rule": MUON if to_muon(p) else FALLBACK} for p in model.parameters() if p.requires_grad}
