"""Adding an optimizer = one module + one spec + one row: the toy of ``tests/toy_optimizer.py`` (Signum, defined
outside the package, registered by its spec, one row in ``tests/optimizer_cases.py``) gets the Trainer name, the
checked state loader, the benchmark and every generic invariant without any other edit."""

from __future__ import annotations

import io
import json

import pytest
import torch
import toy_optimizer
from conftest import tiny_llama_config
from optimizer_cases import CASES

import hf_optim
from hf_optim import bench


def _signum_reference(x0: torch.Tensor, grads: list[torch.Tensor], lr: float, beta1: float, wd: float) -> torch.Tensor:
    """Signum with decoupled decay (``independent``: rate λ·lr_t/lr_peak = λ at a constant lr), in float64."""
    x, m = x0.double().clone(), torch.zeros_like(x0, dtype=torch.float64)
    for g in grads:
        x = x * (1 - wd)
        m = beta1 * m + (1 - beta1) * g.double()
        x = x - lr * torch.sign(m)
    return x


def test_the_toy_steps_as_its_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    grads = [torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    expected = _signum_reference(x.detach(), grads, 1e-2, 0.8, 1e-4)
    opt = toy_optimizer.Signum([x], lr=1e-2, beta1=0.8, weight_decay=1e-4, weight_decay_mode="independent")
    for g in grads:
        x.grad = g
        opt.step()
    torch.testing.assert_close(x.detach(), expected, rtol=0, atol=1e-12)


def test_one_row_puts_the_toy_in_the_central_table():
    rows = [case for case in CASES if case.cls is toy_optimizer.Signum]
    assert len(rows) == 1


def test_the_spec_gives_the_trainer_name_and_the_one_door(tmp_path):
    from transformers import HfArgumentParser, LlamaForCausalLM, Trainer, TrainingArguments

    assert hf_optim.get_spec("toy_signum") is toy_optimizer.SPEC
    argv = f"--output_dir {tmp_path} --optim toy_signum --optim_args beta1=0.5 --learning_rate 1e-3 --report_to none"
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses([*argv.split(), "--use_cpu"])
    model = LlamaForCausalLM(tiny_llama_config())
    opt = Trainer(model=model, args=args).create_optimizer()
    assert isinstance(opt, toy_optimizer.Signum)
    assert {g["beta1"] for g in opt.param_groups} == {0.5} and {g["lr"] for g in opt.param_groups} == {1e-3}
    direct = hf_optim.create_optimizer("toy_signum", model, lr=1e-3, optim_args="beta1=0.5")
    assert [len(g["params"]) for g in direct.param_groups] == [len(g["params"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="beta1"):
        hf_optim.create_optimizer("toy_signum", model, lr=1e-3, optim_args="beta1=1.5")


def _stepped(opt_cls, **kwargs):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = opt_cls([p], **kwargs)
    p.grad = torch.randn(4, 3)
    opt.step()
    return p, opt


def test_the_state_loader_checks_and_reloads_the_toy():
    p, opt = _stepped(toy_optimizer.Signum, lr=1e-2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    fresh = toy_optimizer.Signum([p], lr=1e-2)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"], rtol=0, atol=0)
    # another family's state is refused in both directions, naming what went wrong
    with pytest.raises(ValueError, match="not saved by a compatible optimizer"):
        hf_optim.SGDW([p], lr=1e-2, momentum=0.9).load_state_dict(saved)
    _, sgd = _stepped(hf_optim.SGDW, lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match="not saved by a compatible optimizer"):
        toy_optimizer.Signum([p], lr=1e-2).load_state_dict(sgd.state_dict())
    # a state tensor of the wrong shape is refused before anything is loaded
    saved["state"][0]["exp_avg"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="exp_avg"):
        fresh.load_state_dict(saved)


def test_the_benchmark_times_the_toy(tmp_path):
    names = {case.name for case in bench.all_cases()}
    assert {"toy_signum/auto", "toy_signum/foreach", "toy_signum/for-loop"} <= names
    out = tmp_path / "bench.json"
    argv = ["--size", "tiny", "--threads", "1", "--warmup", "0", "--repeats", "2", "--only", "^toy_signum/"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert {"toy_signum/auto", "toy_signum/foreach", "toy_signum/for-loop"} <= set(rows)
    numel = bench.SIZES["tiny"].numel()
    assert rows["toy_signum/auto"]["state_bytes"] == 4 * numel  # one fp32 buffer per parameter
