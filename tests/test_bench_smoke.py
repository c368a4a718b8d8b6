"""`jaxrlhf bench` end to end at the tiny shape (a few steps; nothing here asserts a speed).

Kept to four compilations: the fit search itself is tested in test_bench_fit.py,
and the remaining measurements reuse the steps compiled here with other arguments.
"""

import json

from jaxrlhf.bench import flops
from jaxrlhf.bench.hf_torch import HfJob, run_job
from jaxrlhf.bench.suite import BenchConfig, model_config
from jaxrlhf.commands.bench import run


def test_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.jsonl"
    cfg = BenchConfig(
        vocab_size=256,
        batch=2,
        seq_len=16,
        warmup=0,
        repeats=2,
        measure=["sft", "dpo", "fit"],
        fit_budget_gib=1.0,
        fit_granularity=16,
        fit_max_len=16,
        devices=1,
        out=str(out),
    )
    record = run(cfg)
    assert json.loads(out.read_text().splitlines()[-1]) == json.loads(json.dumps(record))
    results = record["results"]
    for row in (results["sft"], results["dpo"]):
        assert len(row["step"]["samples_s"]) == 2 and row["tokens_per_s"] > 0 and 0 < row["mfu"]
        assert row["memory"]["total_bytes"] > row["memory"]["temp_bytes"] > 0
    config = model_config(cfg)
    assert results["dpo"]["model_flops_per_step"] == flops.dpo_step_flops(config, 1, 16, reference=True)
    for path in ("chunked", "full"):
        assert results["fit"][path]["longest"] == 16 and results["fit"][path]["ran"] == "ok"
    assert set(record["ratios"]) == {"dpo_vs_sft_time_per_token", "fit_chunked_vs_full_length"}


def test_pytorch_steps_run():
    config = model_config(BenchConfig(vocab_size=256))
    for task in ("sft", "dpo"):
        job = HfJob(config, task, batch=2, seq_len=16, param_dtype="float32", compute_dtype="float32",
                    reference_dtype="float32", gradient_checkpointing=task == "dpo", warmup=0, repeats=2)  # fmt: skip
        result = run_job(job)
        assert len(result["step"]["samples_s"]) == 2 and result["device"] == "cpu"
        # The same architecture: matmul parameters (the tied embedding is the LM head) + norms + q/k/v biases.
        d, h, kv, q = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        assert result["params"] == flops.matmul_params(config) + config.num_layers * (2 * d + (h + 2 * kv) * q) + d


def test_bench_optimizer_state_is_sharded_like_the_trainers():
    """The bench builds its state as training does: FSDP shards the Adam moments too (1/8 each on 8 devices)."""
    import math

    import jax
    import numpy as np

    from jaxrlhf.bench.jax_steps import build_policy
    from jaxrlhf.parallel import MeshConfig, make_mesh
    from jaxrlhf.train.optim import OptimConfig, make_optimizer
    from jaxrlhf.train.step_assembly import abstract_train_state

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    config = model_config(BenchConfig(vocab_size=256))
    policy = build_policy(config, mesh)

    def device0_bytes(tree):
        return sum(
            math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
            for leaf in jax.tree.leaves(tree)
        )

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(policy.state.params))
    # Two f32 moments per parameter, split 8 ways (up to the few leaves that do not divide), plus scalars.
    assert device0_bytes(policy.state.opt_state) < 2 * param_bytes / 8 * 1.25
    _, trained = abstract_train_state(config, make_optimizer(OptimConfig(), 1000)[0], mesh)
    for ours, theirs in zip(jax.tree.leaves(policy.state.opt_state), jax.tree.leaves(trained.opt_state), strict=True):
        assert ours.sharding.is_equivalent_to(theirs.sharding, ours.ndim)


def test_bench_attention_plans_each_kernel_on_packed_rows():
    cfg = BenchConfig(vocab_size=256, num_layers=1, measure=["attention"], attention_impls=["xla", "splash"],
                      attention_lengths=[128], attention_segment=32, devices=1)  # fmt: skip
    rows = run(cfg)["results"]["attention"]
    assert set(rows) == {"xla/128", "splash/128"}
    for row in rows.values():
        assert row["memory"]["temp_bytes"] > 0 and "step" not in row  # CPU: interpret mode is not timed
