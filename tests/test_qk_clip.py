"""MuonClip's qk_clip (issue 25): logits measured against the model's own attention inputs, heads above tau come back
to tau after a step, the others keep their logits, GQA, training keeps every logit at most tau, and the errors."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_optim
from hf_optim.optim.muon import qk_clip
from hf_optim.optim.muon.optimizer import Muon

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama_config

#: layer index -> per-head max logit, recorded by the reference attention function below
_SEEN: dict[int, torch.Tensor] = {}


def _recording_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """The model's own post-RoPE q, k and mask, as its attention receives them: the independent reference."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    logits = (query.double() @ k.double().transpose(-1, -2)) * scaling
    length = query.shape[2]
    keep = torch.ones(length, length, dtype=torch.bool).tril()
    if attention_mask is not None:
        mask = attention_mask[..., :length]
        keep = keep & (mask if mask.dtype == torch.bool else mask == 0)
    _SEEN[module.layer_idx] = logits.masked_fill(~keep, float("-inf")).amax(dim=(0, 2, 3))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register("hf_optim_test_record", _recording_attention)


def _model(kv_heads: int = 4, seed: int = 0, boost: float = 6.0, layers: int = 2) -> LlamaForCausalLM:
    """A tiny LLaMA whose q/k weights are scaled so that some heads' logits are large (per-head boosts differ)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_key_value_heads=kv_heads, num_layers=layers))
    model.config._attn_implementation = "hf_optim_test_record"
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            rows = torch.linspace(1.0, boost, attn.q_proj.out_features // d).repeat_interleave(d)
            attn.q_proj.weight.mul_(rows[:, None])
            attn.k_proj.weight.mul_(boost)
    return model


def _reference_maxima(model, ids, mask=None) -> dict[int, torch.Tensor]:
    _SEEN.clear()
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return {i: t.clone() for i, t in _SEEN.items()}


def _ids(seed=1, batch=3, length=12):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_recorded_maxima_equal_the_models_own_logits(kv_heads):
    model = _model(kv_heads)
    recorder = qk_clip.attach(model)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # right padding on one row: those keys are excluded
    expected = _reference_maxima(model, ids, mask)
    recorder.maxima.clear()
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    for layer, reference in expected.items():
        torch.testing.assert_close(recorder.maxima[layer].double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_heads_above_tau_come_back_to_tau_and_the_others_keep_their_logits(kv_heads):
    model = _model(kv_heads, layers=1)  # one layer: its inputs do not change with the clip
    ids = _ids()
    before = _reference_maxima(model, ids)
    values = torch.cat(list(before.values()))
    ordered = values.sort().values
    middle = len(ordered) // 2
    tau = float(ordered[middle - 1] + ordered[middle]) / 2  # half the heads above, half below
    assert (values > tau * 1.05).any() and (values < tau * 0.95).any()
    opt = hf_optim.create_optimizer("muon_v2", model, lr=0.0, weight_decay=0.0, optim_args=f"qk_clip={tau}")
    untouched = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = _reference_maxima(model, ids)
    for layer in before:
        expected = torch.clamp(before[layer], max=tau)  # lr 0: only the clip changes the weights
        torch.testing.assert_close(after[layer], expected, rtol=1e-5, atol=0)
    d = model.config.hidden_size // model.config.num_attention_heads
    groups = model.config.num_attention_heads // kv_heads
    for i, layer in enumerate(model.model.layers):
        clipped = before[i] > tau
        for g in range(kv_heads):
            if not clipped[g * groups : (g + 1) * groups].any():  # a key group with no clipped head: bitwise equal
                rows = slice(g * d, (g + 1) * d)
                name = f"model.layers.{i}.self_attn.k_proj.weight"
                assert torch.equal(layer.self_attn.k_proj.weight[rows], untouched[name][rows])
    for name, p in model.named_parameters():
        if "q_proj" not in name and "k_proj" not in name:
            assert torch.equal(p, untouched[name]), name


def test_mha_split_is_sqrt_gamma_on_query_and_key():
    model = _model(4)
    ids = _ids()
    before = _reference_maxima(model, ids)[0]
    tau = float(before.min()) / 2  # every head clips
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    k0 = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    opt = hf_optim.create_optimizer("muon_v2", model, lr=0.0, weight_decay=0.0, qk_clip=tau)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    factor = (tau / before.double()).sqrt().repeat_interleave(q0.shape[0] // 4)[:, None]
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.double(), q0.double() * factor)
    torch.testing.assert_close(model.model.layers[0].self_attn.k_proj.weight.double(), k0.double() * factor)


def test_training_holds_logits_near_tau_and_without_it_they_grow():
    """The clip rescales by the logits of the step's own forward, so the step's update can overshoot tau by what
    one update adds (about 6 % here at lr 0.003); the same run without the clip ends 2.8x above tau."""
    ids = [_ids(seed=s, batch=2, length=10) for s in range(12)]
    tau = max(float(t.max()) for t in _reference_maxima(_model(4, boost=10.0), ids[0]).values()) / 2
    peaks = {}
    for setting in (None, tau):
        model = _model(4, boost=10.0)
        opt = hf_optim.create_optimizer("muon_v2", model, lr=0.003, weight_decay=0.0, qk_clip=setting)
        seen = []
        for batch in ids:
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
            seen.append(max(float(t.max()) for t in _reference_maxima(model, batch).values()))
        peaks[setting] = max(seen)
    assert peaks[None] > 2.5 * tau, peaks
    assert peaks[tau] <= 1.1 * tau, peaks


def test_gradient_accumulation_keeps_the_running_maximum_until_the_step():
    model = _model(4)
    recorder = qk_clip.attach(model)
    first, second = _ids(seed=1), _ids(seed=2)
    both = {
        i: torch.maximum(a, b)
        for (i, a), b in zip(_reference_maxima(model, first).items(), _reference_maxima(model, second).values())
    }
    recorder.maxima.clear()
    for batch in (first, second):
        model(input_ids=batch, labels=batch).loss.backward()
    for layer, expected in both.items():
        torch.testing.assert_close(recorder.maxima[layer].double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation forwards are not recorded
        model.eval()
        model(input_ids=_ids(seed=3))
    for layer, expected in both.items():
        torch.testing.assert_close(recorder.maxima[layer].double(), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_with_qk_clip_continues_like_the_uninterrupted_run():
    model = _model(2)
    batches = [_ids(seed=s) for s in range(4)]

    def run(m, opt, part):
        for batch in part:
            m(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()

    straight = copy.deepcopy(model)
    run(straight, hf_optim.create_optimizer("muon_v2", straight, lr=0.02, qk_clip=5.0), batches)
    first = copy.deepcopy(model)
    first_opt = hf_optim.create_optimizer("muon_v2", first, lr=0.02, qk_clip=5.0)
    run(first, first_opt, batches[:2])
    resumed = copy.deepcopy(first)
    resumed_opt = hf_optim.create_optimizer("muon_v2", resumed, lr=0.02, qk_clip=5.0)
    resumed_opt.load_state_dict(copy.deepcopy(first_opt.state_dict()))
    run(resumed, resumed_opt, batches[2:])
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.equal(a, b), name


def test_errors_name_the_argument_and_what_to_do():
    model = _model(4)
    with pytest.raises(ValueError, match="qk_clip must be > 0"):
        hf_optim.create_optimizer("muon_v2", model, lr=0.02, qk_clip=-1.0)
    bare = LlamaForCausalLM(tiny_llama_config())
    by_hand = Muon(bare.parameters(), lr=0.02, qk_clip=2.0)  # knobs checked; the model is needed by the step
    before = [p.detach().clone() for p in bare.parameters()]
    bare(input_ids=_ids(), labels=_ids()).loss.backward()
    with pytest.raises(ValueError, match=r"qk_clip=2\.0 needs the attention .*qk_clip\.attach\(model\)"):
        by_hand.step()
    assert all(torch.equal(a, b) for a, b in zip(before, bare.parameters()))  # raised before any update
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"qk_clip needs LLaMA-family attention .*GPT2LMHeadModel"):
        hf_optim.create_optimizer("muon_v2", gpt2, lr=0.02, optim_args="qk_clip=10")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    with pytest.raises(ValueError, match="q_norm / k_norm"):
        hf_optim.create_optimizer("muon_v2", qwen, lr=0.02, qk_clip=10.0)
    # without qk_clip nothing is attached and nothing is recorded
    plain = LlamaForCausalLM(tiny_llama_config())
    hf_optim.create_optimizer("muon_v2", plain, lr=0.02)
    assert qk_clip.find(plain.parameters()) is None


def test_trainer_optim_args_qk_clip_clips_in_trainer_steps(tmp_path):
    """--optim muon_v2 --optim_args qk_clip=TAU through the Trainer: the recorder is attached and the clip acts in
    the Trainer's own optimizer steps (lr 0, so only the clip moves q/k)."""
    from transformers import Trainer, TrainingArguments

    model = _model(4, layers=1)
    ids = _ids(batch=4, length=12)
    tau = float(torch.cat(list(_reference_maxima(model, ids).values())).min()) / 2  # every head clips

    class Batch(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i].clone()}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim="muon_v2",
        optim_args=f"qk_clip={tau}",
        learning_rate=0.0,
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=Batch()).train()
    after = _reference_maxima(model, ids)
    torch.testing.assert_close(after[0], torch.full_like(after[0], tau), rtol=1e-5, atol=0)
