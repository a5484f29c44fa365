"""``state_dtype``: optimizer state stored in bf16 or block-quantised to 8 / 4 bits between steps.

Checked against the layout and against an independent float64 implementation of the same quantisation scheme (the
formulas of :mod:`hf_optim._quantize`'s docstring, written again here in float64 with a nearest-code search instead of
the closed-form rounding). The generic invariants run over every stored form through the rows of
``tests/optimizer_cases.py``.
"""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim import _quantize, precision

BITS = {"int8": 8, "int4": 4}


def _state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")


def _stepped(cls, shape=(64, 256), steps=3, **kwargs):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = cls([p], **kwargs)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
    return p, opt


@pytest.mark.parametrize(
    ("dtype", "per_param"),
    [("float32", 8.0), ("bfloat16", 4.0), ("int8", 2 * (1 + 4 / 256)), ("int4", 2 * (0.5 + 4 / 256))],
)
def test_adamw_state_bytes_are_what_the_layout_says(dtype, per_param):
    p, opt = _stepped(hf_optim.AdamW, lr=1e-3, state_dtype=dtype)
    assert _state_bytes(opt, p) == per_param * p.numel()


@pytest.mark.parametrize("block", [64, 256, 2048])
def test_block_size_sets_the_scale_count(block):
    p, opt = _stepped(hf_optim.AdamW, shape=(100, 77), lr=1e-3, state_dtype="int8", state_block_size=block)
    per_row = math.ceil(77 / block)  # blocks never cross rows: the last block of each row is short
    for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        assert opt.state[p][key].shape == (100, per_row) and opt.state[p][key].dtype == torch.float32
    assert _state_bytes(opt, p) == 2 * (p.numel() + 4 * 100 * per_row)


@pytest.mark.parametrize(
    ("shape", "codes", "scales"),
    [((300,), (150,), (5,)), ((10, 70), (10, 35), (10, 2)), ((4, 3, 25), (4, 38), (4, 2)), ((6, 7), (6, 4), (6, 1))],
)
def test_int4_layout_packs_each_row_and_scales_each_row_block(shape, codes, scales):
    """The layout of the docstring, counted by hand: 1-D tensors are one row, others rows of their first dim; odd
    columns pad a nibble per row; block 64."""
    x = torch.randn(shape)
    c, s = _quantize.quantize(x, _quantize.Codebook(4, True), 64)
    assert c.shape == codes and c.dtype == torch.uint8 and s.shape == scales
    c8, s8 = _quantize.quantize(x, _quantize.Codebook(8, True), 64)
    assert c8.shape == shape and s8.shape == scales


def test_one_moment_optimizers_and_adafactor_store_their_momentum():
    p, sgd = _stepped(hf_optim.SGDW, lr=1e-2, momentum=0.9, state_dtype="int8")
    assert _state_bytes(sgd, p) == p.numel() * (1 + 4 / 256)
    p, ada = _stepped(hf_optim.Adafactor, shape=(128, 256), lr=1e-2, preset="adafactor_v2", state_dtype="int8")
    state = ada.state[p]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == p.shape
    # the factored statistics are O(rows + cols) and stay fp32
    assert state["exp_avg_sq_row"].dtype == torch.float32 and state["exp_avg_sq_row"].numel() == 128
    # an unfactored second moment (a matrix under min_dim_size_to_factor) is quantised unsigned
    p, ada = _stepped(hf_optim.Adafactor, lr=1e-2, preset="adafactor_v2", state_dtype="int8")
    assert ada.state[p]["exp_avg_sq"].dtype == torch.uint8 and "exp_avg_sq_absmax" in ada.state[p]


def test_small_tensors_stay_in_the_compute_dtype():
    p, opt = _stepped(hf_optim.AdamW, shape=(63, 65), lr=1e-3, state_dtype="int8")  # 4095 < 4096 elements
    assert {t.dtype for k, t in opt.state[p].items()} == {torch.float32}
    p, opt = _stepped(hf_optim.AdamW, shape=(63, 65), lr=1e-3, state_dtype="int8", state_min_numel=4095)
    assert opt.state[p]["exp_avg"].dtype == torch.uint8


# --- an independent float64 implementation of the scheme --------------------------------------------------------------
def _codebook64(bits: int, signed: bool) -> torch.Tensor:
    """Code index -> value, from the docstring: geometric magnitudes 2^(-R j / (n-1)), j = 0 .. n-1 below the max."""
    r = _quantize.BINADES[(bits, signed)]
    if signed:
        n = 2 ** (bits - 1) - 1
        mags = [0.0] + [2.0 ** (-r * (n - k) / (n - 1)) for k in range(1, n + 1)]
        return torch.tensor(mags + [-m for m in mags], dtype=torch.float64)
    n = 2**bits
    return torch.tensor([2.0 ** (-r * (n - 1 - k) / (n - 1)) for k in range(n)], dtype=torch.float64)


def _quantize64(x: torch.Tensor, bits: int, signed: bool, block: int) -> torch.Tensor:
    """Dequantised values: per block, the code nearest to x / absmax in log2 (zero: nearer 0 than the smallest code)."""
    table = _codebook64(bits, signed)
    rows = x.double().reshape(1, -1) if x.dim() < 2 else x.double().reshape(x.shape[0], -1)  # blocks within rows
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], block):
            chunk = rows[r, start : start + block]
            scale = chunk.abs().max()
            if scale == 0:
                out[r, start : start + block] = 0
                continue
            y = chunk / scale
            candidates = table[table != 0] if not signed else table
            for i, value in enumerate(y.tolist()):
                same_sign = candidates[(candidates > 0) if value >= 0 else (candidates < 0)] if signed else candidates
                if signed and abs(value) < 2.0 ** -_quantize.BINADES[(bits, True)] / 2:
                    out[r, start + i] = 0.0
                    continue
                distance = (torch.log2(same_sign.abs()) - math.log2(max(abs(value), 2.0**-126))).abs()
                out[r, start + i] = same_sign[distance.argmin()] * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(3, 48), (3, 40), (120,), (3, 2, 20)])
def test_quantisation_round_trip_equals_the_float64_reference(dtype, signed, shape):
    gen = torch.Generator().manual_seed(1)
    n = math.prod(shape)
    x = (torch.randn(n, generator=gen) * torch.logspace(-6, 0, n)).reshape(shape)  # blocks spanning six decades
    if not signed:
        x = x.square()
    # a whole block of zeros stays zero: the first of row 1, or (1-D, one row) the fourth
    zero_block = (slice(48, 64),) if len(shape) < 2 else (1, slice(0, 16))
    x.reshape(shape[0], -1)[zero_block] = 0.0
    book = _quantize.Codebook(BITS[dtype], signed)
    codes, scales = _quantize.quantize(x, book, 16)
    ours = _quantize.dequantize(codes, scales, book, 16, x.shape, torch.float32)
    ref = _quantize64(x, BITS[dtype], signed, 16)
    # nearest codes agree except where fp32 and fp64 logarithms fall on opposite sides of a midpoint (then one step)
    step = 2.0 ** (_quantize.BINADES[(BITS[dtype], signed)] / (book.magnitudes - 1))
    ratio = (ours.double() / ref.where(ref != 0, torch.ones_like(ref))).where(ref != 0, torch.ones_like(ref))
    assert ((ratio - 1).abs() < 1e-6).float().mean() > 0.99
    assert ((ratio < step * 1.0001) & (ratio > 1 / step / 1.0001)).all()
    assert (ours[ref == 0] == 0).all() and (ours.reshape(shape[0], -1)[zero_block] == 0).all()
    if not signed:  # no zero code: a positive statistic never dequantises to 0
        assert (ours[x > 0] > 0).all()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_stored_adafactor_momentum_equals_adafactor_with_its_momentum_quantised_by_the_reference(dtype):
    """Adafactor (the adafactor_v2 preset, bf16 momentum) with a stored momentum = the same optimizer with fp32 state
    whose momentum is replaced after every step by the float64 reference quantisation of it (rows of 136 in blocks of
    64: a short last block per row; both dims >= 128, so the second moment is factored and stays fp32), 6 steps."""
    gen = torch.Generator().manual_seed(4)
    shape, block = (160, 136), 64
    x0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(6)]
    ours_p, ref_p = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    knobs = dict(lr=1e-2, preset="adafactor_v2", implementation="for-loop")
    ours = hf_optim.Adafactor([ours_p], state_dtype=dtype, state_block_size=block, **knobs)
    ref = hf_optim.Adafactor([ref_p], **knobs)
    book = _quantize.Codebook(BITS[dtype], True)
    for g in grads:
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert "exp_avg_sq_row" in ours.state[ours_p] and "exp_avg_sq" not in ours.state[ours_p]
        momentum = ref.state[ref_p]["exp_avg"]
        assert momentum.dtype == torch.bfloat16  # the preset's momentum dtype: what a stored one expands to
        quantised = _quantize64(momentum.float(), BITS[dtype], True, block)
        state = ours.state[ours_p]
        stored = _quantize.dequantize(state["exp_avg"], state["exp_avg_absmax"], book, block, shape, torch.float64)
        _agree(stored, quantised, book)
        ref.state[ref_p]["exp_avg"] = stored.to(torch.bfloat16)  # continue from the same state (a tie stays one)
        torch.testing.assert_close(ours_p.detach(), ref_p.detach(), rtol=0, atol=1e-6)


def _adamw_step64(x, g, m, v, t, lr, betas, eps, wd):
    """torch.optim.AdamW's step in float64 (coupled decay)."""
    x = x * (1 - lr * wd)
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return x - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _agree(ours: torch.Tensor, ref: torch.Tensor, book: _quantize.Codebook) -> None:
    """Dequantised tensors agree: equal but where fp32 and fp64 round a value near a code midpoint differently (then
    one code step apart)."""
    step = 2.0 ** (book.binades / (book.magnitudes - 1))
    same = torch.isclose(ours, ref, rtol=1e-6, atol=0)
    assert same.float().mean() > 0.99
    nonzero = ref != 0
    ratio = ours[nonzero & ~same] / ref[nonzero & ~same]
    assert ((ratio < step * 1.0001) & (ratio > 1 / step / 1.0001)).all()


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_every_implementation_steps_stored_state_whose_rows_are_not_whole_blocks(impl):
    """Rows of 40 elements in blocks of 16 (the last one short): the expanded state must be a dense tensor, since
    torch's fused CPU Adam reads a strided one (a view of the padded blocks) as if it were dense: another update."""
    runs = {}
    for name in ("for-loop", impl):
        knobs = dict(state_dtype="int8", state_block_size=16, state_min_numel=64, implementation=name)
        p, _ = _stepped(hf_optim.AdamW, shape=(33, 40), lr=1e-2, **knobs)
        runs[name] = p.detach()
    torch.testing.assert_close(runs[impl], runs["for-loop"], rtol=0, atol=1e-6)


def test_a_loaded_strided_state_is_made_dense_before_the_fused_kernel_reads_it():
    p, opt = _stepped(hf_optim.AdamW, shape=(8, 5), lr=1e-2, implementation="fused")
    saved = opt.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        strided = torch.zeros(8, 10)[:, :5]
        saved["state"][0][key] = strided.copy_(saved["state"][0][key])
    results = []
    for impl in ("fused", "for-loop"):
        q = torch.nn.Parameter(p.detach().clone())
        again = hf_optim.AdamW([q], lr=1e-2, implementation=impl)
        again.load_state_dict(
            copy.deepcopy(saved)
        )  # torch keeps the loaded step tensor: a shared one would count twice
        assert again.state[q]["exp_avg"].is_contiguous() and again.state[q]["exp_avg_sq"].is_contiguous()
        q.grad = torch.ones_like(q)
        again.step()
        results.append(q.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


def test_int8_adamw_equals_a_float64_reference_of_the_same_scheme():
    """Five steps of hf_optim.AdamW(state_dtype="int8") against the same steps in float64: dequantise the stored
    moments, torch.optim.AdamW's update, quantise again (the reference's codes from its own nearest-code search)."""
    gen = torch.Generator().manual_seed(2)
    shape, block, lr, betas, eps, wd = (32, 160), 256, 1e-2, (0.9, 0.95), 1e-8, 0.1
    x0 = torch.randn(shape, generator=gen)
    p = torch.nn.Parameter(x0.clone())
    opt = hf_optim.AdamW(
        [p], lr=lr, betas=betas, eps=eps, weight_decay=wd, state_dtype="int8", implementation="for-loop"
    )
    book_m, book_v = _quantize.Codebook(8, True), _quantize.Codebook(8, False)
    x, m, v = x0.double(), torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for t in range(1, 6):
        g = torch.randn(shape, generator=gen)
        p.grad = g
        opt.step()
        x, m, v = _adamw_step64(x, g.double(), m, v, t, lr, betas, eps, wd)
        m, v = _quantize64(m, 8, True, block), _quantize64(v, 8, False, block)
        state = opt.state[p]
        ours_m = _quantize.dequantize(state["exp_avg"], state["exp_avg_absmax"], book_m, block, shape, torch.float64)
        ours_v = _quantize.dequantize(
            state["exp_avg_sq"], state["exp_avg_sq_absmax"], book_v, block, shape, torch.float64
        )
        _agree(ours_m, m, book_m)
        _agree(ours_v, v, book_v)
        m, v = ours_m, ours_v  # both continue from the same stored state: a midpoint tie does not compound
    # the update uses the unquantised new moments, so the weights differ only by fp32 arithmetic
    torch.testing.assert_close(p.detach().double(), x, rtol=0, atol=1e-5)


def test_stored_state_round_trips_through_a_state_dict_and_continues_bitwise():
    for dtype in ("bfloat16", "int8", "int4"):
        p, opt = _stepped(hf_optim.AdamW, lr=1e-3, state_dtype=dtype)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        q = torch.nn.Parameter(p.detach().clone())
        resumed = hf_optim.AdamW([q], lr=1e-3, state_dtype=dtype)
        resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        assert {k: t.dtype for k, t in resumed.state[q].items()} == {k: t.dtype for k, t in opt.state[p].items()}
        g = torch.randn(p.shape)
        p.grad, q.grad = g, g.clone()
        opt.step()
        resumed.step()
        assert torch.equal(p, q), dtype


def test_malformed_stored_state_is_refused_before_loading():
    p, opt = _stepped(hf_optim.AdamW, lr=1e-3, state_dtype="int8")
    saved = opt.state_dict()
    fresh = hf_optim.AdamW([p], lr=1e-3, state_dtype="int8")
    bad = {**saved, "state": {0: {**saved["state"][0], "exp_avg": saved["state"][0]["exp_avg"].float()}}}
    with pytest.raises(ValueError, match=r"exp_avg.*dtype torch.float32, expected torch.uint8"):
        fresh.load_state_dict(bad)
    bad = {**saved, "state": {0: {**saved["state"][0], "exp_avg_absmax": torch.zeros(3)}}}
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        fresh.load_state_dict(bad)
    missing = {k: t for k, t in saved["state"][0].items() if k != "exp_avg_sq_absmax"}
    with pytest.raises(ValueError, match="exp_avg_sq_absmax"):
        fresh.load_state_dict({**saved, "state": {0: missing}})
    assert not fresh.state  # nothing was loaded


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(state_dtype="fp8"), r"state_dtype.*'fp8'"),
        (dict(state_dtype="int8", state_block_size=1), "state_block_size"),
        (dict(state_dtype="int4", state_block_size=33), "even"),
        (dict(state_dtype="int8", state_min_numel=0), "state_min_numel"),
        (dict(state_dtype="int8", state_block_size=2.5), "state_block_size"),
    ],
)
def test_bad_state_settings_are_value_errors_naming_them(kwargs, match):
    for cls in (hf_optim.AdamW, hf_optim.Adafactor, hf_optim.SGDW, hf_optim.Muon):
        with pytest.raises(ValueError, match=match):
            cls([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, **kwargs)


def test_every_registered_optimizer_takes_the_knob():
    for spec in hf_optim.list_optimizers():
        if spec.target.startswith("hf_optim."):
            assert {"state_dtype", "state_block_size", "state_min_numel"} <= set(spec.knobs()), spec.name


def test_trainer_optim_args_reach_the_state(tmp_path):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, optim="adamw_v2", optim_args="state_dtype=int8"
    )
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64))
    opt = Trainer(model=model, args=args).create_optimizer()
    assert {g["state_dtype"] for g in opt.param_groups} == {"int8"}
    with pytest.raises(ValueError, match="state_dtype"):
        TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, optim="adamw_v2",
                          optim_args="state_dtype=int3")  # fmt: skip


def test_the_precision_module_owns_the_state_format():
    fmt = precision.StateFormat.of({"state_dtype": "int8", "state_block_size": 128, "state_min_numel": 10})
    assert fmt.quantized and not fmt.plain and fmt.block == 128
    assert precision.StateFormat.of({}).plain


# --- the committed loss-parity experiment (docs/memory.md) ------------------------------------------------------------
PARITY = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "state_dtype" / "results.jsonl"


def parity_summary(rows: list[dict]) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(recipe, state_dtype) -> (mean final validation loss over seeds, mean state bytes per parameter, seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["recipe"], row["state_dtype"]), []).append(row)
    return {
        key: (
            sum(r["val_loss"] for r in runs) / len(runs),
            sum(r["state_bytes"] / r["params"] for r in runs) / len(runs),
            len(runs),
        )
        for key, runs in groups.items()
    }


def test_committed_loss_parity_meets_the_acceptance():
    """Issue 26: bf16 / int8 state within 0.02 of fp32 state (3 seeds); int4 within 0.05, or documented as not
    recommended with its measured gap."""
    rows = [json.loads(line) for line in PARITY.read_text().splitlines() if line.strip()]
    summary = parity_summary(rows)
    doc = (PARITY.parents[2] / "memory.md").read_text()
    for recipe in ("shakespeare_adamw_llama", "shakespeare_mup_llama_adafactor"):
        fp32, _, seeds = summary[(recipe, "float32")]
        assert seeds == 3
        for dtype, tolerance in (("bfloat16", 0.02), ("int8", 0.02), ("int4", 0.05)):
            loss, per_param, seeds = summary[(recipe, dtype)]
            assert seeds == 3 and f"| {recipe} | `{dtype}` | {loss:.4f} | {loss - fp32:+.4f} | {per_param:.2f} |" in doc
            if dtype == "int4" and abs(loss - fp32) > tolerance:  # allowed when documented so, with the gap
                assert "int4 is not recommended" in doc and f"{abs(loss - fp32):.3f}" in doc, (recipe, loss, fp32)
                continue
            assert abs(loss - fp32) <= tolerance, (recipe, dtype, loss, fp32)
        assert summary[(recipe, "int8")][1] < summary[(recipe, "bfloat16")][1] < summary[(recipe, "float32")][1]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_large_tensors_quantise_through_the_compiled_kernel_as_the_eager_code_does(bits, signed):
    """From COMPILE_MIN_NUMEL elements the codes come from a torch.compile'd kernel (eager where compilation is
    unavailable): the same codes and values as the eager functions."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(_quantize.COMPILE_MIN_NUMEL // 128 + 3, 128, generator=gen)
    x = x if signed else x.square()
    book = _quantize.Codebook(bits, signed)
    codes, scales = _quantize.quantize(x, book, 256)
    # each 128-column row is one block, padded to 256 with zeros
    eager_codes, eager_scales = _quantize._encode_blocks(
        torch.nn.functional.pad(x, (0, 128)), book.magnitudes, book.binades, book.signed, book.bits
    )
    eager_codes = eager_codes[:, :128].reshape(-1)
    if bits == 4:
        eager_codes = eager_codes.view(-1, 2)[:, 0] | (eager_codes.view(-1, 2)[:, 1] << 4)
    assert torch.equal(codes.reshape(-1), eager_codes) and torch.equal(scales.reshape(-1), eager_scales)
    values = _quantize.dequantize(codes, scales, book, 256, x.shape, torch.float32)
    table = book.values().float()
    flat = eager_codes if bits == 8 else torch.stack([eager_codes & 15, eager_codes >> 4], 1).reshape(-1)
    blocks = torch.arange(x.numel()) // 128
    assert torch.equal(values.reshape(-1), table[flat.long()] * eager_scales[blocks])
