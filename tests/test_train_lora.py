"""LoRA training: only adapters are trained and saved, resume is exact, DPO's reference is the base itself,
and bad LoRA settings are one-line errors."""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from jaxrlhf import cli
from jaxrlhf.commands.dpo import run_dpo
from jaxrlhf.commands.export import ExportConfig, run_export
from jaxrlhf.commands.sft import run_sft
from jaxrlhf.config import dump_config
from jaxrlhf.models import ModelConfig, make_logprob_fn
from jaxrlhf.models.lora import LoraSpec
from jaxrlhf.models.lora_io import base_graphdef
from jaxrlhf.train.optim import OptimConfig, make_optimizer
from jaxrlhf.train.run_config import LoraArgs
from jaxrlhf.train.step_assembly import abstract_params, abstract_policy, abstract_train_state, build_train_step
from jaxrlhf.train.steps import DpoLossSpec
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file
from safetensors.torch import save_file as save_torch
from train_fixtures import dpo_config, sft_config

pytestmark = pytest.mark.slow

LOSS_DERIVED = ("loss", "grad_norm", "learning_rate", "trained_tokens", "rewards/margins", "logps/chosen")


def _with_lora(config, **lora):
    return dataclasses.replace(config, model=dataclasses.replace(config.model, lora=LoraArgs(**lora)))


def _train_metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in LOSS_DERIVED if k in r} for r in rows if "loss" in r}


def test_lora_dpo_resumes_bit_identically_and_saves_only_adapters(base_model, tmp_path):
    """Dropout on (its masks come from the checkpointed key and step), the reference is the base, adapters off."""
    lora = dict(rank=4, alpha=8.0, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    straight = _with_lora(dpo_config(tmp_path / "straight", base_model), **lora)
    run_dpo(straight)
    interrupted = _with_lora(dpo_config(tmp_path / "interrupted", base_model, stop_after_steps=3), **lora)
    assert run_dpo(interrupted)["step"] == 3
    assert run_dpo(dataclasses.replace(interrupted, stop_after_steps=0))["step"] == 6
    want, got = _train_metrics(tmp_path / "straight"), _train_metrics(tmp_path / "interrupted")
    assert sorted(want) == sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == want[step], f"step {step} differs after resume"
    # The first step's reference is the untouched base: with B = 0 the policy equals it, so the loss is ln 2.
    assert want[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and want[1]["loss"] == pytest.approx(np.log(2))
    # The checkpoint, read by orbax alone: every saved array is an adapter (or its moments), nothing of the base.
    saved = ocp.PyTreeCheckpointer().metadata(str(tmp_path / "straight" / "checkpoints" / "6" / "state"))
    tree = saved.item_metadata.tree if hasattr(saved, "item_metadata") else saved
    paths = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(tree) if getattr(leaf, "shape", ())]
    params = [p for p in paths if p.startswith("['params']")]
    assert params and all("_lora']" in p for p in paths if "['layers']" in p or p.startswith("['params']")), paths
    assert len(params) == 2 * 3  # A and B of three targets
    assert not any("embed" in p or "norm" in p for p in paths)


def test_lora_run_exports_and_a_run_restarts_from_its_adapter(base_model, tmp_path):
    """The end-of-run exports (merged, adapter), `jaxrlhf export` of the same checkpoint, and the adapter, saved
    again in bf16 by torch (as peft often saves them), as the starting point of the next run: its first eval is
    the last eval of the run that wrote it (up to bf16 rounding)."""
    config = _with_lora(sft_config(tmp_path / "run", base_model, max_steps=4, export=True), rank=4, alpha=8.0)
    summary = run_sft(config)
    run_dir = tmp_path / "run"
    assert summary["export"] == str(run_dir / "hf")
    assert (run_dir / "hf" / "config.json").exists() and (run_dir / "hf" / "model.safetensors").exists()
    adapter = json.loads((run_dir / "hf_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0 and adapter["base_model_name_or_path"] == base_model
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # `jaxrlhf export` of the last checkpoint writes the same two folders (adapter by default, --merge true merged).
    exported = {
        "hf_adapter": run_export(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "adapter"))),
        "hf": run_export(ExportConfig(run_dir=str(run_dir), merge=True, out=str(tmp_path / "merged"))),
    }
    for name, folder in exported.items():
        (want,), (got,) = (run_dir / name).glob("*.safetensors"), folder.glob("*.safetensors")
        want, got = load_file(str(want)), load_file(str(got))
        assert sorted(want) == sorted(got)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    adapter = run_dir / "hf_adapter"
    copy = tmp_path / "copied_adapter"
    shutil.copytree(adapter, copy)
    weights = {k: torch.from_numpy(v).bfloat16() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    save_torch(weights, str(copy / "adapter_model.safetensors"), metadata={"format": "pt"})
    second = _with_lora(
        sft_config(tmp_path / "second", base_model, max_steps=2, eval_at_start=True), adapter_path=str(copy)
    )
    run_sft(second)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    start_eval = [r["eval/loss"] for r in rows if "eval/loss" in r][0]
    assert start_eval == pytest.approx(last_eval, rel=2e-3)


def _tiny(vocab=512, hidden=256, layers=4) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers,
        num_heads=4, num_kv_heads=2, head_dim=hidden // 4, dtype="float32", param_dtype="float32",
    )  # fmt: skip


def _model_bytes(c: ModelConfig, itemsize: int) -> int:
    """Parameter bytes of a Llama-style decoder, counted from its shapes (untied head, no biases)."""
    d, f, kv = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
    per_layer = d * c.num_heads * c.head_dim * 2 + d * kv * 2 + 3 * d * f + 2 * d
    return (2 * c.vocab_size * d + c.num_layers * per_layer + d) * itemsize


def _dpo_argument_bytes(model_config, mesh, *, lora: bool) -> int:
    tx, schedule = make_optimizer(OptimConfig(), 100)
    graphdef, state = abstract_train_state(model_config, tx, mesh)
    frozen = abstract_policy(model_config, mesh)[2]
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct((8, 2, 32), jnp.int32, sharding=rows) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    ref_params = None if lora else abstract_params(model_config, mesh)[1]
    step = build_train_step(
        "dpo",
        logprob_fn=make_logprob_fn(graphdef, chunk_size=32, packed=False),
        tx=tx,
        schedule=schedule,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        spec=DpoLossSpec(),
        reference_logprob_fn=make_logprob_fn(base_graphdef(model_config), chunk_size=32, packed=False) if lora else None,
        reference_is_frozen=lora,
    )
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch, ref_params, frozen).compile()
    return compiled.memory_analysis().argument_size_in_bytes


def test_dpo_lora_step_holds_one_copy_of_the_weights():
    from jaxrlhf.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    plain = _tiny()
    model = _model_bytes(plain, 4)
    lora = dataclasses.replace(plain, lora=LoraSpec(rank=8, alpha=16.0), dtype="bfloat16")
    frozen_bf16 = _model_bytes(lora, 2)  # the LoRA base is stored in the compute dtype
    full = _dpo_argument_bytes(plain, mesh, lora=False)
    assert full > 4 * model  # policy + Adam's two moments + the reference model
    with_lora = _dpo_argument_bytes(lora, mesh, lora=True)
    d, f, q, kv = plain.hidden_size, plain.intermediate_size, plain.num_heads * plain.head_dim, 2 * plain.head_dim
    # rank x (fan_in + fan_out) per adapter: q, k, v, o, gate, up, down; f32 values and Adam's two moments.
    adapters = 8 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)) * plain.num_layers * 4 * 3
    batch = 4 * 8 * 2 * 32 * 4
    assert frozen_bf16 < with_lora <= frozen_bf16 + adapters + batch + 64, (with_lora, frozen_bf16, adapters)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.lora.target_modules", "[qkv_proj]"], "model.lora.target_modules"),
        (["--model.lora.target_modules", "layers\\.0\\..*q_proj"], "model.lora.target_modules"),
        (["--model.lora.rank", "0"], "model.lora.rank must be > 0"),
        (["--model.lora.weight_qtype", "fp4"], "model.lora.weight_qtype"),
        (["--model.lora.alpha", "0"], "model.lora.alpha must be > 0"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(base_model, tmp_path, capsys, override, message):
    path = tmp_path / "sft.yaml"
    dump_config(sft_config(tmp_path / "run", base_model), path)
    assert cli.main(["sft", "--config_path", str(path), "--model.lora.alpha", "8", *override]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("jaxrlhf sft:")]
    assert len(lines) == 1 and message in lines[0], err


def test_an_adapter_folder_of_another_model_is_named(base_model, tmp_path, capsys):
    """An adapter trained on a wider model (peft's format, written here by hand) is refused by its key."""
    from safetensors.numpy import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"})
    )
    config = json.loads((pathlib.Path(base_model) / "config.json").read_text())
    wide = 2 * config["hidden_size"]
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        name = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{name}.lora_A.weight"] = np.zeros((2, wide), np.float32)
        tensors[f"{name}.lora_B.weight"] = np.zeros((wide, 2), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    path = tmp_path / "sft.yaml"
    dump_config(sft_config(tmp_path / "run", base_model), path)
    assert cli.main(["sft", "--config_path", str(path), "--model.lora.adapter_path", str(folder)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("jaxrlhf sft:")]
    assert len(lines) == 1 and "model.lora.adapter_path" in lines[0] and "shape" in lines[0], err


def test_nf4_refuses_a_model_it_cannot_pack_by_key():
    from jaxrlhf.config import ConfigError
    from jaxrlhf.models.presets import preset
    from jaxrlhf.train.run_config import with_lora

    odd = dataclasses.replace(preset("tiny", vocab_size=300), intermediate_size=101)
    with pytest.raises(ConfigError, match="model.lora.weight_qtype nf4 cannot store this model .intermediate_size"):
        with_lora(odd, LoraArgs(weight_qtype="nf4"))
    assert with_lora(odd, LoraArgs(weight_qtype="int8")).weight_qtype == "int8"  # int8 needs no pairs
