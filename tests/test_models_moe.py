"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers: log-probs, router losses, gradients,
save_hf, greedy generation, and expert parallelism on 8 fake devices.

References are transformers' own forward/backward passes on the same weights (its ``aux_loss`` and
``router_logits`` outputs), float64 numpy, and a float64 one-hot (dense) MoE layer written here.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from model_fixtures import MOE_VARIANTS, VOCAB, HFZoo, reference_token_logprobs

from jaxrlhf.models import config_from_hf, config_to_hf, load_hf, make_logprob_fn, save_hf, token_logprobs
from jaxrlhf.models.generate import generate
from jaxrlhf.ops import moe as moe_ops
from jaxrlhf.parallel import MeshConfig, make_mesh, partition_specs
from jaxrlhf.train import kto_steps, steps
from jaxrlhf.train.router_loss import RouterLoss


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> HFZoo:
    return HFZoo(tmp_path_factory.mktemp("moe_zoo"))


def _padded_batch(seed: int, rows: int = 4, length: int = 10) -> dict[str, np.ndarray]:
    """Right-padded rows of different lengths, with every predictable real token trained."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (rows, length)).astype(np.int32)
    lengths = np.linspace(length, length // 2, rows).astype(int)
    segment_ids = (np.arange(length) < lengths[:, None]).astype(np.int32)
    tokens = tokens * segment_ids
    loss_mask = segment_ids.copy()
    loss_mask[:, 0] = 0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


def _hf_forward(zoo, variant, batch, *, labels=False):
    """transformers' output on a padded batch (its attention_mask: our segment_ids > 0); labels: its SFT loss,
    with gradients."""
    import contextlib

    import torch

    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    mask = torch.as_tensor(batch["segment_ids"] > 0, dtype=torch.long)
    kwargs = {"labels": torch.where(mask > 0, tokens, -100)} if labels else {}
    with contextlib.nullcontext() if labels else torch.no_grad():
        return zoo.torch_model(variant)(tokens, attention_mask=mask, output_router_logits=True, **kwargs)


def _reference_router(router_logits, mask: np.ndarray, top_k: int) -> dict[str, float]:
    """float64 z-loss and load (max share over mean) of transformers' per-layer router logits, padding left out."""
    keep = mask.reshape(-1) > 0
    logits = np.concatenate([layer.detach().double().numpy()[keep] for layer in router_logits])
    top = np.argsort(-logits, axis=-1)[:, :top_k]
    counts = np.bincount(top.reshape(-1), minlength=logits.shape[-1]).astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    lse = (peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True)))[:, 0]
    return {"z_loss": float(np.mean(lse**2)), "load_max": float(counts.max() / counts.mean()),
            "load": counts / counts.sum()}  # fmt: skip


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_logprobs_match_transformers_padded_and_packed(zoo, variant):
    model, config = load_hf(zoo.folder(variant), dtype=jnp.float32)
    assert config.is_moe and config.num_experts == 8
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)
    reference = zoo.logits(variant, tokens)
    assert reference.std() > 0.5
    for segment_ids in (None, jnp.ones_like(tokens)):
        lp = np.asarray(nnx.jit(token_logprobs, static_argnames="chunk_size")(
            model, jnp.asarray(tokens), segment_ids=segment_ids, chunk_size=5))  # fmt: skip
        np.testing.assert_array_less(np.abs(lp - reference_token_logprobs(reference, tokens)).max(), 1e-4)
    # Two examples and padding in one row: each example's tokens as transformers runs it alone.
    first, second = tokens[:1, :7], tokens[1:, :6]
    row = np.concatenate([first, second, np.zeros((1, 3), np.int32)], axis=1)
    segment_ids = np.array([[1] * 7 + [2] * 6 + [0] * 3], np.int32)
    lp = np.asarray(nnx.jit(token_logprobs, static_argnames="chunk_size")(
        model, jnp.asarray(row), segment_ids=jnp.asarray(segment_ids), chunk_size=8))  # fmt: skip
    expected = np.concatenate([reference_token_logprobs(zoo.logits(variant, first), first),
                               reference_token_logprobs(zoo.logits(variant, second), second), np.zeros((1, 3))], 1)
    np.testing.assert_array_less(np.abs(lp - expected).max(), 1e-4)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_sft_loss_aux_loss_and_gradients_match_transformers(zoo, variant):
    """One micro-batch of padded rows: our SFT objective with the router loss is transformers' ``loss``
    (mean NLL + router_aux_loss_coef * aux_loss), ``moe/aux_loss`` its ``aux_loss``, and the gradients of the
    router and the experts its autograd's; z-loss and load against float64 numpy of its router logits."""
    model, config = load_hf(zoo.folder(variant), dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    batch = _padded_batch(1)
    aux = RouterLoss(config.num_experts, config.router_aux_loss_coef * 100, z_coef=0.01)  # large enough to show
    logprob_fn = make_logprob_fn(graphdef, chunk_size=4, packed=False)
    loss, grads, sums = jax.jit(lambda p, b: steps.sft_gradients(p, b, logprob_fn=logprob_fn, aux_loss=aux))(
        params, batch
    )
    metrics = aux.step_metrics(sums)
    out, expected = _hf_gradients(zoo, variant, batch, aux)
    assert len(out.router_logits) == config.num_layers - len(config.dense_mlp_layers)  # MoE layers only
    router = _reference_router(out.router_logits, batch["segment_ids"], config.num_experts_per_tok)
    np.testing.assert_allclose(float(metrics["moe/aux_loss"]), out.aux_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["moe/z_loss"]), router["z_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["moe/load_max"]), router["load_max"], rtol=1e-6)
    load = [float(metrics[f"moe/load/e{k}"]) for k in range(config.num_experts)]  # 8 experts: e0 .. e7
    np.testing.assert_allclose(load, router["load"], rtol=1e-6)
    np.testing.assert_allclose(float(loss), out.loss.item() + aux.z_coef * router["z_loss"], rtol=1e-5)
    _assert_layer_gradients(grads, expected, config)
    if config.dense_mlp_layers:  # HF layer 0 is dense: its MLP's gradients as transformers'
        mlp = zoo.torch_model(variant).model.layers[0].mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            want = getattr(mlp, name).weight.grad.double().numpy().T
            np.testing.assert_allclose(np.asarray(grads["dense_layers"]["mlp"][name][...][0]), want,
                                       atol=2e-5 * np.abs(want).max(), err_msg=name)  # fmt: skip


def _hf_gradients(zoo, variant, batch, aux: RouterLoss):
    """transformers' output and its autograd gradients of layer 1's router and experts (our layouts; layer 1
    is a MoE layer in every variant) for
    loss + aux_coef * aux_loss + z_coef * (mean squared logsumexp of its router logits)."""
    import torch

    torch_model = zoo.torch_model(variant)
    torch_model.zero_grad()
    saved, torch_model.router_aux_loss_coef = torch_model.router_aux_loss_coef, aux.aux_coef
    try:
        out = _hf_forward(zoo, variant, batch, labels=True)
        keep = torch.as_tensor(batch["segment_ids"].reshape(-1) > 0)
        z = torch.cat([torch.logsumexp(layer[keep], -1) ** 2 for layer in out.router_logits]).mean()
        (out.loss + aux.z_coef * z).backward()
    finally:
        torch_model.router_aux_loss_coef = saved
    layer = torch_model.model.layers[1].mlp  # transformers 5 names Mixtral's in-memory block mlp too
    f = layer.experts.down_proj.shape[-1]
    gate_up = layer.experts.gate_up_proj.grad.double().numpy()  # [E, 2F, D]: gate rows first
    return out, {
        "router": layer.gate.weight.grad.double().numpy().T,
        "gate_proj": gate_up[:, :f].transpose(0, 2, 1),
        "up_proj": gate_up[:, f:].transpose(0, 2, 1),
        "down_proj": layer.experts.down_proj.grad.double().numpy().transpose(0, 2, 1),
    }


def _assert_layer_gradients(grads, expected, config):
    """Our gradients of layer 1's MoE parameters (``layers`` holds the MoE layers) against transformers'."""
    index = config.layer_stacks()["layers"].index(1)
    for name, value in expected.items():
        ours = np.asarray(grads["layers"]["mlp"][name][...][index])
        assert np.abs(value).max() > 1e-4, name
        np.testing.assert_allclose(ours, value, atol=2e-5 * np.abs(value).max(), err_msg=name)


def test_aux_loss_is_averaged_over_micro_batches_and_dpo_takes_the_policys(zoo):
    """Two micro-batches (rows 0, 2 and 1, 3): the logged aux loss is the mean of transformers' aux_loss of
    each; in DPO it is the policy's on both sides of its pairs (the reference adds none), in KTO on its examples."""
    model, config = load_hf(zoo.folder("qwen3_moe"), dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=4, packed=False)
    aux = RouterLoss(config.num_experts, config.router_aux_loss_coef, num_micro_batches=2)
    batch = _padded_batch(2)
    _, _, sums = jax.jit(lambda p, b: steps.sft_gradients(p, b, logprob_fn=logprob_fn, num_micro_batches=2,
                                                          aux_loss=aux))(params, batch)  # fmt: skip
    halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    expected = np.mean([_hf_forward(zoo, "qwen3_moe", half).aux_loss.item() for half in halves])
    np.testing.assert_allclose(float(aux.step_metrics(sums)["moe/aux_loss"]), expected, rtol=1e-5)
    pairs = {k: v.reshape(2, 2, -1) for k, v in batch.items()}  # rows (0, 1) and (2, 3) are pairs
    spec = steps.DpoLossSpec(beta=0.1)
    one = RouterLoss(config.num_experts, config.router_aux_loss_coef)
    _, _, sums = jax.jit(lambda p, b: steps.dpo_gradients(p, b, logprob_fn=logprob_fn, spec=spec, ref_params=p,
                                                          aux_loss=one))(params, pairs)  # fmt: skip
    np.testing.assert_allclose(float(one.step_metrics(sums)["moe/aux_loss"]),
                               _hf_forward(zoo, "qwen3_moe", batch).aux_loss.item(), rtol=1e-5)  # fmt: skip
    # KTO: the policy's on the examples (row 0 of each [2, T] example-row), not on the KL rows.
    kto = {**pairs, "label": np.array([1, 0], np.int32)}
    kto_spec = kto_steps.KtoLossSpec()
    _, _, sums, _ = jax.jit(lambda p, b: kto_steps.kto_gradients(p, b, logprob_fn=logprob_fn, spec=kto_spec,
                                                                 ref_params=p, aux_loss=one))(params, kto)  # fmt: skip
    examples = {k: v[0::2] for k, v in batch.items()}
    np.testing.assert_allclose(float(one.step_metrics(sums)["moe/aux_loss"]),
                               _hf_forward(zoo, "qwen3_moe", examples).aux_loss.item(), rtol=1e-5)  # fmt: skip


def test_grouped_matmul_equals_a_dense_one_hot_layer_and_shards_add_up():
    """ops.moe.grouped_mlp against a float64 one-hot MoE (every expert on every token, weighted by the
    routing); a shard's experts (expert_offset) give that shard's share, and the shards add up to the whole."""
    rng = np.random.default_rng(0)
    n, d, f, e, k = 11, 6, 5, 8, 3
    x = rng.normal(size=(n, d))
    gate, up, down = rng.normal(size=(e, d, f)), rng.normal(size=(e, d, f)), rng.normal(size=(e, f, d))
    weights, experts, _ = moe_ops.route(jnp.asarray(rng.normal(size=(n, e)), jnp.float32), k, True)
    combine = np.zeros((n, e))
    np.put_along_axis(combine, np.asarray(experts), np.asarray(weights, np.float64), axis=1)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    dense = sum(combine[:, i : i + 1] * ((silu(x @ gate[i]) * (x @ up[i])) @ down[i]) for i in range(e))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    whole = moe_ops.grouped_mlp(f32(x), experts, weights, f32(gate), f32(up), f32(down), jax.nn.silu)
    np.testing.assert_allclose(np.asarray(whole), dense, rtol=1e-4, atol=1e-4)
    shards = [
        moe_ops.grouped_mlp(f32(x), experts, weights, f32(gate[s : s + 2]), f32(up[s : s + 2]), f32(down[s : s + 2]),
                            jax.nn.silu, expert_offset=s)  # fmt: skip
        for s in range(0, e, 2)
    ]
    np.testing.assert_allclose(np.asarray(sum(shards)), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe_dense"])
def test_expert_parallel_forward_and_router_stats_match_transformers(zoo, variant):
    """On fsdp 4 x tensor 2: experts split by the expert axis over fsdp (2 of 8 per device) and their width
    over tensor; the compiled forward exchanges tokens (all-gather, reduce-scatter) and matches transformers
    (qwen3_moe_dense: with dense layers between the MoE layers)."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model, config = load_hf(zoo.folder(variant), dtype=jnp.float32, mesh=mesh)
    graphdef, params = nnx.split(model)
    specs = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(partition_specs(params, mesh))}
    for name in ("gate_proj", "up_proj", "down_proj"):
        spec = specs[f"layers/mlp/{name}"]
        assert spec[1] == "fsdp" and "tensor" in spec, (name, spec)  # [layers, E, ...]: E over fsdp
    batch = _padded_batch(3, rows=8, length=12)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=6, packed=False)
    forward = jax.jit(lambda p, b: logprob_fn(p, b["tokens"], b["positions"], b["segment_ids"], router_stats=True))
    with jax.set_mesh(mesh):
        lowered = forward.lower(params, batch)
        hlo = lowered.compile().as_text()
        token_lp, stats = forward(params, batch)
    assert "all-gather" in hlo and "reduce-scatter" in hlo
    out = _hf_forward(zoo, variant, batch)
    expected = reference_token_logprobs(out.logits.detach().double().numpy(), batch["tokens"]) * (
        batch["segment_ids"] > 0
    )
    np.testing.assert_array_less(np.abs(np.asarray(token_lp) - expected).max(), 1e-4)
    aux = moe_ops.router_losses(stats, num_experts=config.num_experts)["aux_loss"]
    np.testing.assert_allclose(float(aux), out.aux_loss.item(), rtol=1e-5)
    # The backward through the exchange: gradients of the split experts and the router as transformers'.
    loss_spec = RouterLoss(config.num_experts, 0.5, z_coef=0.01)
    with jax.set_mesh(mesh):
        loss, grads, _ = jax.jit(lambda p, b: steps.sft_gradients(p, b, logprob_fn=logprob_fn, aux_loss=loss_spec))(
            params, batch
        )
    out, expected = _hf_gradients(zoo, variant, batch, loss_spec)
    _assert_layer_gradients(grads, expected, config)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_save_hf_round_trip_and_greedy_generation(zoo, variant, tmp_path):
    """Saved per expert as transformers saves them, loaded back by transformers with the same logits; greedy
    generation equal to transformers' token for token."""
    import torch
    import transformers

    model, config = load_hf(zoo.folder(variant), dtype=jnp.float32)
    save_hf(model, config, tmp_path / "out")
    ours = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = safetensors.numpy.load_file(str(zoo.folder(variant) / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_from_hf(saved, dtype="float32", param_dtype="float32") == config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), zoo.torch_model(variant)(tokens).logits.numpy(),
                                   atol=1e-5)  # fmt: skip
    prompts = [np.random.default_rng(5).integers(0, VOCAB, n).tolist() for n in (7, 3)]
    completions = generate(model, prompts, max_new_tokens=8)
    for row, prompt in enumerate(prompts):
        expected = zoo.torch_model(variant).generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert completions.completion(row) == expected, row


def test_config_reads_both_expert_count_keys_and_places_dense_layers_as_transformers_does():
    """Which layers get a dense MLP (mlp_only_layers, decoder_sparse_step) as transformers' own Qwen3-MoE
    builds them; written back, transformers builds the same layers again."""
    import transformers

    base = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "moe_intermediate_size": 16, "num_experts_per_tok": 2}  # fmt: skip
    assert config_from_hf({**base, "num_experts": 6}).num_experts == 6  # the Hub's key
    assert config_from_hf({**base, "num_local_experts": 6}).num_experts == 6  # transformers 5's

    def dense_layers_of(hf: dict) -> tuple[int, ...]:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf))
        return tuple(i for i, layer in enumerate(model.model.layers) if isinstance(
            layer.mlp, transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeMLP))  # fmt: skip

    for extra in ({}, {"decoder_sparse_step": 2}, {"decoder_sparse_step": 3}, {"mlp_only_layers": [0, 4]},
                  {"decoder_sparse_step": 2, "mlp_only_layers": [1, 2]}):  # fmt: skip
        hf = {**base, "num_experts": 6, **extra}
        config = config_from_hf(hf)
        assert config.dense_mlp_layers == dense_layers_of(hf), extra
        written = {k: v for k, v in config_to_hf(config, dtype=None).items() if k not in ("architectures", "dtype")}
        assert dense_layers_of(written) == config.dense_mlp_layers, extra
        assert config_from_hf(written) == config, extra
    with pytest.raises(ValueError, match="all 6 layers are dense"):
        config_from_hf({**base, "num_experts": 6, "mlp_only_layers": list(range(6))})
    with pytest.raises(ValueError, match="decoder_sparse_step=0 must be an integer >= 1"):
        config_from_hf({**base, "num_experts": 6, "decoder_sparse_step": 0})


def test_dry_run_splits_every_expert_tensor_by_expert_and_plans_the_grouped_matmuls(zoo, tmp_path):
    """The SFT step of a MoE model (router losses included) plans on fsdp 8: every expert tensor split on its
    expert axis (one of 8 experts per device), the grouped matmuls planned with the stand-in."""
    from train_fixtures import sft_config

    from jaxrlhf.data import asset_path
    from jaxrlhf.train.dry_run import plan

    config = sft_config(tmp_path / "run", str(zoo.folder("qwen3_moe")), dry_run=True)
    config.data.tokenizer, config.data.eval_fraction = str(asset_path("tokenizer")), 0.0
    experts = plan(config, "sft")["experts"]
    assert experts == {"tensors": 3, "axes": ["fsdp"], "per_device": 1, "num_experts": 8, "unsplit": [],
                       "grouped_matmul": "planned"}, experts  # fmt: skip
