"""Dry runs: optimizer state is sharded like the params, and the plan names the step's largest arrays.

(Every shipped config is planned at its real shape and device count in test_train_fit.py.)"""

import pathlib

import jax
import pytest
from flax import nnx
from model_fixtures import hf_config

from jaxrlhf.config import load_config
from jaxrlhf.data import asset_path
from jaxrlhf.models import init_model
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel.mesh import MeshConfig, make_mesh
from jaxrlhf.train.optim import OptimConfig, init_opt_state, make_optimizer
from jaxrlhf.commands.sft import run_sft
from jaxrlhf.train.run_config import SftConfig

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_optimizer_moments_are_sharded_like_their_parameters():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = init_model(preset("tiny", vocab_size=512), mesh=mesh)
    params = nnx.state(model)
    tx, _ = make_optimizer(OptimConfig(weight_decay=0.1), 10)
    opt_state = init_opt_state(tx, params, mesh)
    param_specs = [x.sharding.spec for x in jax.tree.leaves(params)]
    adam = opt_state[1][0]  # chain(clip, adamw) -> adamw -> ScaleByAdamState
    assert [x.sharding.spec for x in jax.tree.leaves(adam.mu)] == param_specs
    assert [x.sharding.spec for x in jax.tree.leaves(adam.nu)] == param_specs
    assert any(spec != jax.sharding.PartitionSpec() for spec in param_specs)


@pytest.mark.parametrize("attention_impl", ["xla", "splash", "blockwise"])
def test_dry_run_lists_the_largest_arrays(attention_impl):
    """Packed rows of 512: XLA's attention materialises [.., 512, 512] scores among the largest arrays of the
    step; splash and blockwise attention none at all."""
    config = load_config(SftConfig, CONFIGS[0].parent / "demo_sft.yaml", [
        "--dry_run", "true", "--model.preset", "tiny", "--data.tokenizer", str(asset_path("tokenizer")),
        "--data.max_length", "512", "--model.attention_impl", attention_impl, "--dry_run_devices", "0",
    ])  # fmt: skip
    report = run_sft(config)
    largest = report["largest_arrays"]
    assert len(largest) == 5 and largest == sorted(largest, key=lambda a: -a["bytes"])
    scores = [a for a in largest if a["shape"].endswith(",512,512]")]
    assert bool(scores) == (attention_impl == "xla"), largest


@pytest.mark.parametrize("variant, planned", [("gemma2", "blockwise"), ("llama3", "xla")])
def test_a_gpu_dry_run_plans_soft_capped_cudnn_layers_as_blockwise(tmp_path, capsys, variant, planned):
    """Padded rows on an H100 resolve to cuDNN, which does not compile for CPU: a soft-capped model's layers
    run blockwise there (cuDNN has no cap) and are planned so; other models plan XLA's attention."""
    folder = tmp_path / variant
    folder.mkdir()
    (folder / "config.json").write_text(hf_config(variant).to_json_string())
    config = load_config(SftConfig, CONFIGS[0].parent / "demo_sft.yaml", [
        "--dry_run", "true", "--model.path", str(folder), "--data.tokenizer", str(asset_path("tokenizer")),
        "--data.packing", "none", "--model.attention_impl", "auto", "--dry_run_device", "h100",
        "--dry_run_devices", "0", "--data.max_length", "64", "--data.batch_size", "8", "--data.eval_batch_size", "8",
    ])  # fmt: skip
    run_sft(config)
    assert f"attention auto -> cudnn -> {planned}" in capsys.readouterr().out
