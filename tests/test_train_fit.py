"""Will it fit? The dry run's verdict against the device's memory, the way out when it does not, batches that
must split over the data-parallel devices, FSDP that finds a dimension that divides, and eval that fits
wherever training fits."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.commands.sft import run_sft
from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.data import asset_path
from jaxrlhf.models import init_model, make_logprob_fn
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel import MeshConfig, make_mesh, partition_specs
from jaxrlhf.train import steps
from jaxrlhf.train.dry_run import plan
from jaxrlhf.train.run_config import DpoConfig, KtoConfig, SftConfig
from jaxrlhf.train.verdict import GIB, PlanDoesNotFit
from train_fixtures import sft_config

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PRESET_OF = {"qwen2.5-0.5b": "qwen2.5-0.5b", "qwen2.5-1.5b": "qwen2.5-1.5b", "llama3-8b": "llama3-8b", "demo": "tiny",
             "gemma2-9b": "gemma2-9b", "qwen3-30b-a3b": "qwen3-30b-a3b", "mixtral-8x7b": "mixtral-8x7b"}


_DRIVER = """
import json, sys
from jaxrlhf import cli
for args in json.loads(sys.argv[1]):
    print("=== config", args[2], flush=True)
    print("=== exit", cli.main(args), flush=True)
"""


def _task_of(path: pathlib.Path) -> str:
    text = path.read_text()
    return "kto" if "\nkto:" in text else "dpo" if "dpo" in path.name or "\ndpo:" in text else "sft"


def _load(path: pathlib.Path):
    return load_config({"sft": SftConfig, "dpo": DpoConfig, "kto": KtoConfig}[_task_of(path)], path)


_DEVICE_COUNTS = sorted({_load(path).dry_run_devices for path in CONFIGS})


@pytest.mark.slow
@pytest.mark.parametrize("devices", _DEVICE_COUNTS, ids=lambda n: f"{n}_devices")
def test_every_shipped_config_fits_its_stated_hardware(devices):
    """At its real shape, mesh and device count (fake CPU devices): one process per device count, planning
    each of its configs in turn (the imports are paid once, the plans are independent)."""
    paths = [path for path in CONFIGS if _load(path).dry_run_devices == devices]
    runs = []
    for path in paths:
        config = _load(path)
        assert config.hardware, f"{path.name} must name its hardware"
        name = next(v for k, v in PRESET_OF.items() if path.name.startswith(k))
        runs.append([_task_of(path), "--config_path", str(path), "--dry_run", "true", "--model.preset", name,
                     "--data.tokenizer", str(asset_path("tokenizer"))])  # fmt: skip
    command = [sys.executable, "-c", _DRIVER, json.dumps(runs)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sections = out.stdout.split("=== config ")[1:]
    assert len(sections) == len(paths), out.stdout[-3000:] + out.stderr[-3000:]
    for path, section in zip(paths, sections):
        config, task = _load(path), _task_of(path)
        assert section.startswith(str(path)) and "=== exit 0" in section, section + out.stderr[-3000:]
        assert f"verdict: fits on {config.hardware}" in section, section
        gib = {m[1]: float(m[2]) for m in re.finditer(r"│ (\w+) +│ +([\d.]+) │", section)}
        # f32 master weights and two f32 Adam moments, each sharded the same way (3 printed decimals).
        assert gib["optimizer"] == pytest.approx(2 * gib["parameters"], abs=2e-3), (path.name, gib)
        if config.model.lora is not None:  # the base is frozen, and it is DPO's reference (no second copy)
            assert gib["frozen"] > 10 * gib["parameters"] and gib["reference"] == 0, (path.name, gib)
        elif task != "sft" and config.reference_setting() == "model":
            assert gib["reference"] > 0, path.name
        elif task != "sft":  # precomputed, none, or a reference-free loss: no reference in memory
            assert gib["reference"] == 0, path.name


def _tiny(tmp_path, base_model, **overrides):
    return sft_config(tmp_path / "run", base_model, dry_run=True, **overrides)


def test_a_plan_that_does_not_fit_exits_1_with_the_micro_batches_that_would(base_model, tmp_path, capsys):
    config = _tiny(tmp_path, base_model)
    config.data.batch_size, config.data.max_length = 64, 512
    one, four = plan(config, "sft"), plan(dataclasses.replace(config, micro_batches=4), "sft")
    assert four["total"] < one["total"]
    budget = (four["total"] + one["total"]) / 2 / 0.9  # room for 4 micro-batches, not for 1 (10% headroom)
    config.dry_run_device_memory_gib = budget / GIB
    with pytest.raises(PlanDoesNotFit, match="the plan does not fit") as info:
        run_sft(config)
    out = capsys.readouterr().out
    assert "verdict: does not fit" in out and "biggest: temporaries" in out
    way = info.value.report["ways_out"][0]
    assert way.startswith("micro_batches: ") and int(way.split()[1]) in (2, 4)
    # The way out it names does fit.
    micro = int(way.split()[1])
    assert run_sft(dataclasses.replace(config, micro_batches=micro))["verdict"] == "fits"


def test_known_devices_and_an_unknown_one(base_model, tmp_path):
    config = _tiny(tmp_path, base_model, hardware="tpu-v5e")
    report = run_sft(config)
    assert report["verdict"] == "fits" and report["budget"]["bytes"] == 16 * GIB
    assert report["budget"]["usable"] == int(16 * GIB * 0.9)
    with pytest.raises(ConfigError, match="unknown device 'tpu-v9'.*tpu-v5p"):
        run_sft(dataclasses.replace(config, dry_run_device="tpu-v9"))


@pytest.mark.parametrize(
    "batch, micro, mesh, message",
    [
        (16, 4, MeshConfig(data=1, fsdp=-1, tensor=1),
         r"data.batch_size 16 with micro_batches 4 does not split over the 8 data-parallel devices.*"
         r"use data.batch_size 32, or with batch 16: micro_batches 1, 2"),
        (3, 1, MeshConfig(data=1, fsdp=2, tensor=4),
         r"data.batch_size 3 with micro_batches 1 does not split over the 2 data-parallel devices.*"
         r"use data.batch_size 2 or 4"),
    ],
)  # fmt: skip
def test_batches_that_do_not_split_over_the_devices_are_config_errors(base_model, tmp_path, batch, micro, mesh, message):
    for dry_run in (True, False):
        config = sft_config(tmp_path / f"run{dry_run}", base_model, micro_batches=micro, mesh=mesh, dry_run=dry_run)
        config.data.batch_size = batch
        with pytest.raises(ConfigError, match=message):
            run_sft(config)


def test_fsdp_shards_another_dimension_when_the_hidden_size_does_not_divide():
    config = dataclasses.replace(preset("tiny", vocab_size=256), hidden_size=100, num_heads=4, head_dim=25)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    specs = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(partition_specs(
        nnx.eval_shape(lambda: init_model(config)), mesh))}  # fmt: skip
    shapes = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(
        lambda: init_model(config))))}  # fmt: skip
    for name in ("layers/mlp/gate_proj", "layers/mlp/up_proj", "layers/mlp/down_proj", "embed"):
        entries = [(e,) if isinstance(e, str) else tuple(e or ()) for e in specs[name]]
        dims = [i for i, axes in enumerate(entries) if "fsdp" in axes]
        assert len(dims) == 1, (name, shapes[name], specs[name])  # hidden 100 does not divide by 8: another dim
        assert shapes[name][dims[0]] % 8 == 0 and shapes[name][dims[0]] != 100
        assert not (name.startswith("layers") and dims[0] == 0)  # never the stacked layer axis
    # Norm scales are never meant to be FSDP-sharded: they stay whole.
    assert specs["layers/attn_norm/scale"] == jax.sharding.PartitionSpec(None, None)


def test_eval_runs_in_the_training_micro_batches_with_the_same_results(base_model, tmp_path):
    config = preset("tiny", vocab_size=512)
    graphdef, params = nnx.split(init_model(config, seed=3))
    logprob_fn = make_logprob_fn(graphdef, chunk_size=16, packed=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 512, (8, 2, 24)).astype(np.int32)
    loss_mask = (rng.random((8, 2, 24)) < 0.7).astype(np.int32)
    loss_mask[..., 0] = 0  # the first token has no context (the data layer guarantees it)
    batch = {
        "tokens": tokens, "loss_mask": loss_mask,
        "segment_ids": np.ones((8, 2, 24), np.int32), "positions": np.broadcast_to(np.arange(24), (8, 2, 24)),
        "pair_mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.int32),
    }  # fmt: skip
    whole = steps.dpo_eval_pairs(params, batch, logprob_fn=logprob_fn)
    split = steps.dpo_eval_pairs(params, batch, logprob_fn=logprob_fn, num_micro_batches=4)
    for key in whole:
        np.testing.assert_allclose(np.asarray(split[key]), np.asarray(whole[key]), rtol=1e-5, err_msg=key)
    sft = {k: v[:, 0] for k, v in batch.items() if k != "pair_mask"}
    a = steps.sft_eval_sums(params, sft, logprob_fn=logprob_fn)
    b = steps.sft_eval_sums(params, sft, logprob_fn=logprob_fn, num_micro_batches=4)
    np.testing.assert_allclose(float(b["nll_sum"]), float(a["nll_sum"]), rtol=1e-5)
    assert float(b["trained_tokens"]) == float(np.sum(sft["loss_mask"])) == float(a["trained_tokens"])


def test_the_dry_run_plans_eval_in_training_sized_pieces(base_model, tmp_path):
    config = _tiny(tmp_path, base_model, micro_batches=1)
    config.data.batch_size, config.data.eval_batch_size, config.data.max_length = 8, 64, 256
    report = plan(config, "sft")
    # Eight times the rows of a training step, in eight training-sized pieces: no eight-fold activations.
    assert report["eval_temporaries"] <= 1.5 * report["temporaries"]
