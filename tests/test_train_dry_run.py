"""Dry runs compile every shipped config's step on fake devices; optimizer state is sharded like the params."""

import pathlib

import jax
import pytest
from flax import nnx

from jaxrlhf.config import load_config
from jaxrlhf.data import asset_path
from jaxrlhf.models import init_model
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel.mesh import MeshConfig, make_mesh
from jaxrlhf.train.optim import OptimConfig, init_opt_state, make_optimizer
from jaxrlhf.commands.dpo import run_dpo
from jaxrlhf.commands.sft import run_sft
from jaxrlhf.train.run_config import DpoConfig, SftConfig

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))
PRESET_OF = {"qwen2.5-0.5b": "qwen2.5-0.5b", "qwen2.5-1.5b": "qwen2.5-1.5b", "llama3-8b": "llama3-8b", "demo": "tiny"}


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


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_dry_runs_on_8_devices(path):
    is_dpo = "dpo" in path.name
    name = next(v for k, v in PRESET_OF.items() if path.name.startswith(k))
    overrides = ["--dry_run", "true", "--model.preset", name, "--data.tokenizer", str(asset_path("tokenizer")),
                 "--dry_run_devices", "0"]  # this process's 8 devices (test_train_fit plans the real counts)
    if name == "llama3-8b":  # keep the CPU compile small: the plan's shape, fewer rows
        overrides += ["--data.batch_size", "16", "--data.max_length", "2048"]
    config = load_config(DpoConfig if is_dpo else SftConfig, path, overrides)
    report = (run_dpo if is_dpo else run_sft)(config)
    assert report["devices"] == 8
    # f32 master weights and two f32 Adam moments, each sharded the same way.
    assert report["optimizer"] == pytest.approx(2 * report["parameters"], rel=1e-3)
    if is_dpo and config.dpo.reference == "model":
        assert report["reference"] > 0
    assert report["temporaries"] > 0


@pytest.mark.parametrize("attention_impl", ["xla", "splash"])
def test_dry_run_lists_the_largest_arrays(attention_impl):
    """Packed rows of 512: XLA's attention materialises [.., 512, 512] scores among the largest arrays of the
    step; splash attention none at all."""
    config = load_config(SftConfig, CONFIGS[0].parent / "demo_sft.yaml", [
        "--dry_run", "true", "--model.preset", "tiny", "--data.tokenizer", str(asset_path("tokenizer")),
        "--data.max_length", "512", "--model.attention_impl", attention_impl, "--dry_run_devices", "0",
    ])  # fmt: skip
    report = run_sft(config)
    largest = report["largest_arrays"]
    assert len(largest) == 5 and largest == sorted(largest, key=lambda a: -a["bytes"])
    scores = [a for a in largest if a["shape"].endswith(",512,512]")]
    assert bool(scores) == (attention_impl == "xla"), largest
