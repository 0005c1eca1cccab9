"""The pieces of Self Forcing training that exist so far: adapters on one frozen base, the
self-rollout's gradient path, and the DMD / critic losses."""

from __future__ import annotations

import torch

from sftools.lora.forms import Lora
from sftools.models.causal_wan import CausalWanModel
from sftools.sampling.load import load_transformer
from sftools.sampling.schedules import few_step_schedule
from sftools.training.adapters import CRITIC, GENERATOR, adapter_lora, adapter_parameters, add_adapters, load_adapter, using
from sftools.training.dmd import critic_timestep, dmd_gradient, dmd_loss
from sftools.training.rollout import exit_step, rollout
from sftools.wan.config import TINY_128
from sftools.wan.tiny import random_state_dict, write_checkpoint


def tiny_model(tmp_path, rank=2):
    state = random_state_dict(TINY_128, seed=0)
    path = write_checkpoint(str(tmp_path / "base.safetensors"), state, "original", TINY_128)
    transformer, _ = load_transformer(path)
    add_adapters(transformer, rank)
    return transformer, path


def test_gradients_reach_only_the_generator_adapter_and_only_through_each_blocks_exit_step(tmp_path):
    transformer, _ = tiny_model(tmp_path)
    base_before = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}
    for p in adapter_parameters(transformer, GENERATOR):  # leave zero-init so gradients reach lora_A too
        torch.nn.init.normal_(p, std=0.05)
    model = CausalWanModel(transformer)
    grad_calls = []
    forward = transformer.forward

    def counting(*args, **kwargs):
        grad_calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    transformer.forward = counting
    context = torch.randn(1, 5, TINY_128.text_dim)
    with using(transformer, GENERATOR):
        video = rollout(model, context, few_step_schedule(4, 5.0), (1, 16, 9, 4, 4), 3, exit_at=2,
                        generator=torch.Generator().manual_seed(0), shift=5.0, text_len=512)
        video.square().mean().backward()
    # 3 blocks x (3 steps up to the exit + 1 refresh); exactly one call per block under autograd.
    assert len(grad_calls) == 12 and sum(grad_calls) == 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(transformer, GENERATOR))
    assert all(p.grad is None for p in adapter_parameters(transformer, CRITIC))
    for n, p in transformer.named_parameters():
        if "lora_" not in n:
            assert not p.requires_grad and p.grad is None and torch.equal(p, base_before[n]), n


def test_the_stored_cache_holds_no_gradient_and_later_blocks_still_train(tmp_path):
    transformer, _ = tiny_model(tmp_path)
    for p in adapter_parameters(transformer, GENERATOR):
        torch.nn.init.normal_(p, std=0.05)
    model = CausalWanModel(transformer)
    with using(transformer, GENERATOR):
        video = rollout(model, torch.randn(1, 5, 32), few_step_schedule(4, 5.0), (1, 16, 6, 4, 4), 3, exit_at=0,
                        generator=torch.Generator().manual_seed(1), shift=5.0, text_len=512)
        second_block = torch.autograd.grad(video[:, :, 3:].sum(), adapter_parameters(transformer, GENERATOR))
    assert any(g.abs().sum() > 0 for g in second_block)
    assert model.state.self_kv["cond"][0].k.requires_grad is False


def test_the_dmd_gradient_is_self_forcings_on_fixed_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g, dtype=torch.float64)
    dmd_loss(x, real, fake).backward()
    by_hand = torch.empty_like(x)
    for i in range(2):
        by_hand[i] = (fake[i] - real[i]) / (x[i] - real[i]).abs().mean()
    assert torch.allclose(dmd_gradient(x.detach(), real, fake), by_hand)
    assert torch.allclose(x.grad, by_hand / x.numel(), rtol=1e-12, atol=0)


def test_critic_timesteps_are_shifted_and_clamped():
    t = critic_timestep(10_000, 5.0, torch.Generator().manual_seed(0))
    assert float(t.min()) == 20.0 and float(t.max()) == 980.0 and float(t.median()) > 700  # shift 5 favours high noise


def test_exit_steps_are_the_same_for_every_process_and_resumed_run():
    draws = [exit_step(4, seed=7, iteration=i) for i in range(200)]
    assert draws == [exit_step(4, seed=7, iteration=i) for i in range(200)]
    assert set(draws) == {0, 1, 2, 3}


def test_a_generator_adapter_loaded_from_a_lora_equals_the_lora_merged_at_load(tmp_path):
    from sftools.lora.forms import write_lora

    transformer, path = tiny_model(tmp_path, rank=3)
    g = torch.Generator().manual_seed(2)
    lora = Lora()
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.cross_attn.o"):
        out_dim = 64 if module.endswith("ffn.0") else 256
        lora.factors[module + ".weight"] = (torch.randn(out_dim, 3, generator=g) * 0.1, torch.randn(3, 256, generator=g) * 0.1)
    load_adapter(transformer, GENERATOR, lora)
    back = adapter_lora(transformer, GENERATOR)
    for param, (up, down) in lora.factors.items():
        assert torch.equal(back.factors[param][0], up) and torch.equal(back.factors[param][1], down)
    write_lora(str(tmp_path / "l.safetensors"), lora, "comfyui", torch.float32, {})
    merged, _ = load_transformer(path, [(str(tmp_path / "l.safetensors"), 1.0)])
    x, t, ctx = torch.randn(1, 16, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 512, 32)
    with torch.no_grad(), using(transformer, GENERATOR):
        adapted = transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    with torch.no_grad():
        expected = merged(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        with using(transformer, None):
            teacher = transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        base, _ = load_transformer(path)
        plain = base(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.allclose(adapted, expected, atol=1e-5)
    assert torch.equal(teacher, plain)  # adapters disabled: the teacher is the base itself


def test_the_rollout_pads_the_prompt_to_the_models_text_len(tmp_path):
    transformer, _ = tiny_model(tmp_path)
    rows = []
    forward = transformer.forward
    transformer.forward = lambda *a, **k: rows.append(k["encoder_hidden_states"].shape[1]) or forward(*a, **k)
    with torch.no_grad(), using(transformer, GENERATOR):
        rollout(CausalWanModel(transformer), torch.randn(1, 5, 32), few_step_schedule(4, 5.0), (1, 16, 3, 4, 4), 3,
                exit_at=1, generator=torch.Generator().manual_seed(0), shift=5.0, text_len=64)
    assert rows == [64, 64, 64]  # two steps and the refresh
