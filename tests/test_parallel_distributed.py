"""Multi-process start-up: environment detection, and a real 2-process x 4-device CPU run."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from model_fixtures import packed_batch, tiny_config

from jaxrlhf.models import init_model, load_hf, make_logprob_fn
from jaxrlhf.ops import losses
from jaxrlhf.parallel import MeshConfig, detect_cluster, initialize_distributed, make_mesh

_SLURM = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}


@pytest.mark.parametrize(
    "env, cluster",
    [
        ({}, None),
        (_SLURM, "slurm"),
        ({**_SLURM, "SLURM_NTASKS": "1"}, None),  # a one-task allocation is a plain single process
        ({k: v for k, v in _SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # salloc shell, not a step
        ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # single-host TPU VM
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "tpu"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
    ],
)
def test_detect_cluster(env, cluster):
    assert detect_cluster(env) == cluster


def test_single_process_does_nothing_and_partial_flags_are_an_error():
    assert initialize_distributed(env={}) is False
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="coordinator_address, num_processes and process_id together"):
        initialize_distributed("127.0.0.1:1234", num_processes=2)


CONFIG = tiny_config()
_WORKER = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
from jaxrlhf.parallel import MeshConfig, initialize_distributed, make_mesh

process_id = int(sys.argv[1])
assert initialize_distributed("127.0.0.1:{port}", num_processes=2, process_id=process_id)

import jax, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx
from model_fixtures import packed_batch, tiny_config
from jaxrlhf.models import init_model, load_hf, make_logprob_fn, save_hf
from jaxrlhf.ops import losses

mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
batch = packed_batch(np.random.default_rng(5), 8, 16, 128)
sharding = NamedSharding(mesh, P(("data", "fsdp")))
rows = slice(4 * process_id, 4 * process_id + 4)
batch = {{k: jax.make_array_from_process_local_data(sharding, v[rows]) for k, v in batch.items()}}

def loss_of(model):
    graphdef, params = nnx.split(model)
    def loss(params, batch):
        lp = make_logprob_fn(graphdef, chunk_size=8)(params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return losses.sft_loss(lp, batch["loss_mask"])[0]
    with jax.set_mesh(mesh):
        return float(jax.jit(loss)(params, batch).addressable_data(0))

model = init_model(tiny_config(), seed=3, mesh=mesh)
result = {{"devices": jax.device_count(), "local": jax.local_device_count(), "loss": loss_of(model)}}
save_hf(model, model.config, {out!r})
multihost_utils.sync_global_devices("saved")
reloaded, _ = load_hf({out!r}, dtype="float32", mesh=mesh)
result["reloaded_loss"] = loss_of(reloaded)
print("RESULT" + json.dumps(result))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_one_mesh_and_save_one_checkpoint(tmp_path):
    out = tmp_path / "exported"
    script = tmp_path / "worker.py"
    tests = str(pathlib.Path(__file__).parent)
    script.write_text(textwrap.dedent(_WORKER).format(tests=tests, port=_free_port(), out=str(out)))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n\n".join(outputs)
    results = [json.loads(line[6:]) for output in outputs for line in output.splitlines() if line.startswith("RESULT")]
    assert [r["devices"] for r in results] == [8, 8] and [r["local"] for r in results] == [4, 4]

    # The reference: the same model, batch and loss in this single process on its 8 devices.
    model = init_model(CONFIG, seed=3)
    batch = jax.tree.map(jnp.asarray, packed_batch(np.random.default_rng(5), 8, 16, CONFIG.vocab_size))
    graphdef, params = nnx.split(model)
    lp = make_logprob_fn(graphdef, chunk_size=8)(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    reference = float(losses.sft_loss(lp, batch["loss_mask"])[0])
    for r in results:
        np.testing.assert_allclose([r["loss"], r["reloaded_loss"]], reference, rtol=1e-5)

    # Process 0 alone wrote the gathered checkpoint, and it holds exactly the initial parameters.
    saved, _ = load_hf(out, dtype=jnp.float32, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(saved)), nnx.to_pure_dict(nnx.state(model)))
    embed = saved.embed[...]
    assert embed.sharding.is_equivalent_to(NamedSharding(embed.sharding.mesh, P("tensor", "fsdp")), 2)
