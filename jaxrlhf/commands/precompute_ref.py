"""`jaxrlhf precompute-ref`: the reference model's log-probs of every pair, stored for `dpo.reference: precomputed`."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxrlhf.config import ConfigError
from jaxrlhf.data import make_iterator
from jaxrlhf.models import make_logprob_fn
from jaxrlhf.models.lora_io import base_graphdef
from jaxrlhf.parallel.distributed import initialize_distributed
from jaxrlhf.parallel.mesh import make_mesh
from jaxrlhf.train import steps
from jaxrlhf.train.assembly import check_vocabularies, lm_head_chunk_size, load_model
from jaxrlhf.train.prefetch import batch_sharding, place_batch, rows_sharded
from jaxrlhf.train.reference import all_pairs_config, pair_keys, write_reference
from jaxrlhf.train.run_config import DpoConfig
from jaxrlhf.train.step_assembly import split_policy

__all__ = ["DpoConfig", "run_precompute_ref"]


def run_precompute_ref(config: DpoConfig) -> pathlib.Path:
    if config.dpo.spec().reference_free:
        raise ConfigError(
            f"dpo.loss_type {config.dpo.loss_type} is reference-free: there are no reference log-probs to precompute"
        )
    d = config.distributed
    initialize_distributed(d.coordinator_address, d.num_processes, d.process_id, force=d.force)
    mesh = make_mesh(config.mesh)
    model_path = config.reference_model_path()
    if config.model.lora is not None and not config.dpo.reference_path:
        # A LoRA policy's reference is its base as training holds it (QLoRA: quantized), adapters off.
        policy, ref_config = load_model(
            config.model, model_path, mesh, param_dtype=config.model.param_dtype, tokenizer=config.data.tokenizer,
            sequence_parallel=config.mesh.sequence_parallel, seed=config.seed, adapter_weights=False,
        )  # fmt: skip
        graphdef, ref_params = base_graphdef(ref_config), split_policy(policy)[2]
    else:
        reference, ref_config = load_model(
            dataclasses.replace(config.model, lora=None), model_path, mesh, param_dtype=config.dpo.reference_dtype,
            tokenizer=config.data.tokenizer, sequence_parallel=config.mesh.sequence_parallel,
        )  # fmt: skip
        graphdef, ref_params = nnx.split(reference)
    check_vocabularies(config, ref_config)
    chunk_size = lm_head_chunk_size(config, "dpo", mesh, ref_config.vocab_size)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=chunk_size, packed=False)
    pair_logps = jax.jit(lambda params, batch: steps.pair_logps(logprob_fn, params, batch)[0])
    keys, logps = [], []
    with jax.set_mesh(mesh):
        for batch in make_iterator(all_pairs_config(config.data), task="dpo", split="eval"):
            real = batch.pop("pair_mask").astype(bool)
            device_batch = place_batch(batch, rows_sharded(mesh))
            # Back to this process's own rows, in the order it placed them.
            local = np.asarray(
                multihost_utils.global_array_to_host_local_array(
                    pair_logps(ref_params, device_batch), mesh, batch_sharding(mesh, 2).spec
                )
            )
            keys.append(pair_keys(batch)[real])
            logps.append(local[real])
    folder = pathlib.Path(config.reference_folder())
    write_reference(
        folder,
        np.concatenate(keys),
        np.concatenate(logps),
        model_path=model_path,
        tokenizer_path=config.data.tokenizer,
        data=config.data,
    )
    print(f"wrote reference log-probs of {sum(len(k) for k in keys)} pairs to {folder}")
    return folder
