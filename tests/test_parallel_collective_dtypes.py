"""FSDP moves weights in the compute dtype and reduces their gradients in float32: read from the HLO right
after XLA's SPMD partitioner (a dump of that pass), before XLA:CPU's own late dtype rewrites."""

import os
import pathlib
import re
import subprocess
import sys

_SCRIPT = """
import dataclasses, jax, jax.numpy as jnp
from jaxrlhf.models import make_logprob_fn
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel import MeshConfig, make_mesh
from jaxrlhf.train.optim import OptimConfig, make_optimizer
from jaxrlhf.train.prefetch import batch_sharding
from jaxrlhf.train.step_assembly import abstract_train_state, build_train_step
mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
config = dataclasses.replace(preset("llama3-8b"), hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
                             num_kv_heads=4, head_dim=32, vocab_size=4096, dtype="bfloat16", param_dtype="float32")
tx, schedule = make_optimizer(OptimConfig(), 10)
graphdef, state = abstract_train_state(config, tx, mesh)
batch = {k: jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=batch_sharding(mesh, 2))
         for k in ("tokens", "loss_mask", "segment_ids", "positions")}
step = build_train_step("sft", logprob_fn=make_logprob_fn(graphdef, chunk_size=64, packed=False), tx=tx,
                        schedule=schedule, state_shardings=jax.tree.map(lambda x: x.sharding, state))
with jax.set_mesh(mesh):
    step.lower(state, batch).compile()
"""
# One layer's slice of each linear weight: q, k/v, o, gate/up, down.
_KERNELS = {"256,8,32", "256,4,32", "8,32,256", "256,1024", "1024,256"}


def test_weights_gather_in_bf16_and_their_gradients_reduce_in_f32(tmp_path):
    flags = f"--xla_force_host_platform_device_count=8 --xla_dump_to={tmp_path} --xla_dump_hlo_pass_re=spmd-partitioning"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", _SCRIPT], env=env, check=True, timeout=300, cwd=pathlib.Path(__file__).parent)
    (dump,) = tmp_path.glob("*jit_step*after_spmd-partitioning*.txt")
    gathers, reductions = [], []
    for line in dump.read_text().splitlines():
        match = re.search(r"= (\w+)\[([\d,]+)\]\S* (all-gather|all-reduce|reduce-scatter)\(", line)
        if match and match.group(2) in _KERNELS:
            (gathers if match.group(3) == "all-gather" else reductions).append((match.group(1), match.group(2)))
    assert {shape for _, shape in gathers} == _KERNELS and {dtype for dtype, _ in gathers} == {"bf16"}, gathers
    assert {shape for _, shape in reductions} == _KERNELS and {dtype for dtype, _ in reductions} == {"f32"}, reductions
