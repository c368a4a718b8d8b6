"""`--dry_run true`: will this config fit? Compile the real steps on abstract arrays and judge the plan.

Nothing is allocated: parameters are ``eval_shape``d on the config's mesh, the
optimizer state's shardings are the trainer's, and the jitted train step
(``build_train_step``, the one training runs, donation included) and the eval
step (in the training micro-batches) are lowered and compiled on
``ShapeDtypeStruct`` inputs. Where the hardware is absent (a laptop planning a pod
run), the mesh is built from fake CPU devices (``dry_run_devices``). The plan is
judged against the device's memory (``verdict``): one that does not fit exits 1
with the settings that would.

MoE models: XLA:CPU expands ``ragged_dot`` densely over every expert, so on CPU
devices the grouped matmuls are planned with ``ops.moe.planned_ragged_dot``, a
stand-in with an accelerator kernel's memory (``moe_impl: planned``), and the
plan says so; it also reports how the expert tensors are split (``experts``).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

from jaxrlhf.models import make_logprob_fn
from jaxrlhf.ops import attention as attention_kernels
from jaxrlhf.parallel.mesh import make_mesh
from jaxrlhf.parallel.rules import LOGICAL_AXES, spec_axes, wants_fsdp
from jaxrlhf.train import kto_steps, steps
from jaxrlhf.models.lora_io import base_graphdef
from jaxrlhf.train.assembly import lm_head_chunk_size
from jaxrlhf.train.largest_arrays import largest_arrays
from jaxrlhf.train.optim import make_optimizer
from jaxrlhf.train.prefetch import batch_sharding
from jaxrlhf.train.router_loss import router_loss_of
from jaxrlhf.train.run_config import (
    TrainConfig,
    check_batch_layout,
    eval_micro_batches,
    loss_spec,
    model_config_of,
    pairs_per_row,
    reference_is_base,
    rows_are_packed,
)
from jaxrlhf.train.step_assembly import abstract_params, abstract_policy, abstract_train_state, build_train_step
from jaxrlhf.train.verdict import PlanDoesNotFit, budget_of, judge, platform_of, ways_out

GIB = 2**30
PARTS = ("parameters", "frozen", "optimizer", "reference", "batch", "temporaries")  # frozen: a LoRA policy's base


def use_fake_devices(count: int) -> None:
    """Plan on ``count`` fake CPU devices; effective only before JAX first touches a backend."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def _replicated_bytes(params, mesh) -> int:
    """Per-device bytes of parameters meant for FSDP that it could not split (no dimension divides)."""
    if mesh.shape["fsdp"] == 1:
        return 0
    total = 0
    for variable in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        leaf = variable.get_value()
        if "fsdp" not in spec_axes(leaf.sharding.spec) and wants_fsdp(variable.get_metadata().get(LOGICAL_AXES, ())):
            total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _expert_sharding(params, mesh, model_config) -> dict:
    """How the expert tensors are split: the mesh axes of their expert dimension, and any left replicated."""
    tensors, replicated, axes = 0, [], set()
    for path, variable in nnx.to_flat_state(params):
        logical = variable.get_metadata().get(LOGICAL_AXES, ())
        if "expert" not in logical:
            continue
        tensors += 1
        spec = variable.get_value().sharding.spec
        entry = spec[logical.index("expert")] if len(spec) > logical.index("expert") else None
        if entry is None:
            replicated.append("/".join(map(str, path)))
        axes |= spec_axes(jax.sharding.PartitionSpec(entry))
    split = math.prod(mesh.shape[a] for a in axes) if axes else 1
    return {"tensors": tensors, "axes": sorted(axes), "per_device": model_config.num_experts // split,
            "num_experts": model_config.num_experts, "unsplit": replicated,
            "grouped_matmul": model_config.moe_impl}  # fmt: skip


def _abstract_batch(config: TrainConfig, task: str, rows: int, mesh, *, eval_: bool) -> dict:
    shape = (rows, config.data.max_length) if task == "sft" else (rows, 2, config.data.max_length)
    batch = {
        key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, len(shape)))
        for key in ("tokens", "loss_mask", "segment_ids", "positions")
    }
    if task == "dpo" and config.reference_setting() == "precomputed":
        slots = pairs_per_row(config, task) if not eval_ else None  # packed pair-rows: [B, S, 2]
        ref_shape = shape[:2] if slots is None else (rows, slots, 2)
        batch["ref_logps"] = jax.ShapeDtypeStruct(ref_shape, jnp.float32, sharding=batch_sharding(mesh, len(ref_shape)))
    for key in ("label",) * (task == "kto") + ("pair_mask",) * (task != "sft" and eval_):
        batch[key] = jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=batch_sharding(mesh, 1))
    return batch


def plan(config: TrainConfig, task: str) -> dict:
    """The per-device memory plan (bytes) of training and of evaluation, from XLA's compiled steps."""
    spec = loss_spec(config, task)
    mesh = make_mesh(config.mesh)
    check_batch_layout(config, dict(mesh.shape))
    model_config = model_config_of(
        config.model, config.model.path, param_dtype=config.model.param_dtype, tokenizer=config.data.tokenizer,
        sequence_parallel=config.mesh.sequence_parallel,
    )  # fmt: skip
    if model_config.is_moe and jax.devices()[0].platform == "cpu":
        model_config = dataclasses.replace(model_config, moe_impl="planned")
    tx, schedule = make_optimizer(config.optim, config.max_steps or 1000)
    graphdef, state = abstract_train_state(model_config, tx, mesh)
    frozen = abstract_policy(model_config, mesh)[2]
    batch = _abstract_batch(config, task, config.data.batch_size, mesh, eval_=False)
    chunk_size = lm_head_chunk_size(config, task, mesh, model_config.vocab_size)
    packed = rows_are_packed(config, task)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=chunk_size, packed=packed)
    ref_params, reference_bytes = None, 0
    base_reference = task != "sft" and reference_is_base(config)
    base_fn = make_logprob_fn(base_graphdef(model_config), chunk_size=chunk_size, packed=packed) if base_reference else None
    if task != "sft" and config.reference_setting() == "model" and not base_reference:
        ref_config = model_config_of(
            dataclasses.replace(config.model, lora=None), config.reference_model_path(),
            param_dtype=config.reference_args.reference_dtype, tokenizer=config.data.tokenizer,
            sequence_parallel=config.mesh.sequence_parallel,
        )  # fmt: skip
        _, ref_params = abstract_params(ref_config, mesh)
        reference_bytes = _per_device_bytes(ref_params)
    step = build_train_step(
        task,
        logprob_fn=logprob_fn,
        tx=tx,
        schedule=schedule,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        micro_batches=config.micro_batches,
        spec=spec,
        reference_logprob_fn=base_fn,
        reference_is_frozen=base_reference,
        dropout=model_config.uses_dropout,
        pairs_per_row=pairs_per_row(config, task),
        aux_loss=router_loss_of(model_config, config.model, micro_batches=config.micro_batches),
    )
    with jax.set_mesh(mesh):
        compiled_step = step.lower(state, batch, ref_params, frozen).compile()
    train = compiled_step.memory_analysis()
    report = {
        "devices": mesh.devices.size,
        "mesh": dict(mesh.shape),
        "parameters": _per_device_bytes(state.params),
        "frozen": _per_device_bytes(frozen) if frozen is not None else 0,
        "optimizer": _per_device_bytes(state.opt_state),
        "reference": reference_bytes,
        "batch": _per_device_bytes(batch),
        "temporaries": int(train.temp_size_in_bytes),
        "replicated_parameters": _replicated_bytes(state.params, mesh),
        "parameter_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "frozen_count": sum(math.prod(x.shape) for x in jax.tree.leaves(frozen)) if frozen is not None else 0,
        "largest_arrays": largest_arrays(compiled_step.as_text()),
        **({"experts": _expert_sharding(state.params, mesh, model_config)} if model_config.is_moe else {}),
    }
    report["total"] = sum(report[k] for k in PARTS)
    if config.has_eval():
        eval_rows = config.data.eval_batch_size or config.data.batch_size
        eval_batch = _abstract_batch(config, task, eval_rows, mesh, eval_=True)
        micro = eval_micro_batches(config)

        def evaluate(params, eval_batch, ref_params, frozen):
            bound = steps.bind_frozen(logprob_fn, frozen)
            if task == "sft":
                return steps.sft_eval_sums(params, eval_batch, logprob_fn=bound, num_micro_batches=micro)
            return (steps.dpo_eval_pairs if task == "dpo" else kto_steps.kto_eval_rows)(
                params, eval_batch, logprob_fn=bound, num_micro_batches=micro,
                ref_params=frozen if base_reference else ref_params, ref_logprob_fn=base_fn,
            )  # fmt: skip

        with jax.set_mesh(mesh):
            lowered = jax.jit(evaluate).lower(state.params, eval_batch, ref_params, frozen)
            compiled = lowered.compile().memory_analysis()
        # Eval runs mid-training: the optimizer state and the reference stay resident.
        report["eval_temporaries"] = int(compiled.temp_size_in_bytes)
        report["eval_total"] = (
            report["parameters"] + report["frozen"] + report["optimizer"] + reference_bytes + _per_device_bytes(eval_batch)
            + report["eval_temporaries"]
        )  # fmt: skip
    return report


def _attention_of_target(config: TrainConfig, task: str) -> TrainConfig:
    """On fake CPU devices, plan the attention kernel the target device would run (``auto`` resolved for it):
    splash and pallas_gpu in interpret mode; cuDNN does not compile for CPU, so its layers plan XLA's, and
    soft-capped ones (which cuDNN sends to blockwise) plan blockwise."""
    requested = config.model.attention_impl
    impl = attention_kernels.resolve(requested, platform=platform_of(config), packed=rows_are_packed(config, task))
    if impl == "cudnn":
        soft_cap = model_config_of(
            config.model, config.model.path, param_dtype=config.model.param_dtype, tokenizer=config.data.tokenizer
        ).attn_logit_softcapping
        if not attention_kernels.supports(impl, window=None, soft_cap=soft_cap):  # every layer runs blockwise
            print(f"dry run on CPU devices: attention {requested} -> cudnn -> blockwise (soft-capped layers)")
            impl = "blockwise"
        else:  # XLA's attention holds the [T, T] scores, so this overestimates.
            print(f"dry run on CPU devices: attention {requested} -> cudnn -> xla (temporaries are an upper bound)")
            impl = "xla"
    elif impl != requested:
        print(f"dry run on CPU devices: attention {requested} -> {impl} (interpret mode)")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl=impl))


def dry_run(config: TrainConfig, task: str) -> dict:
    """Plan ``config``, print it and, when the device is known, its verdict; raise ``PlanDoesNotFit`` if it
    does not fit (after searching the micro-batch and remat settings that would)."""
    if config.dry_run_devices > 0:
        use_fake_devices(config.dry_run_devices)
    if jax.devices()[0].platform == "cpu":
        config = _attention_of_target(config, task)
    report = plan(config, task)
    _print(report, config, task)
    budget = budget_of(config)
    if budget is None:
        Console().print("no verdict: name the device (hardware, --dry_run_device or --dry_run_device_memory_gib)")
        return report
    verdict = judge(report, budget, config.dry_run_headroom)
    report.update(verdict=verdict.word, budget=verdict.as_dict())
    Console().print(verdict.line, highlight=False)
    if not verdict.fits:
        outs = ways_out(config, task, report, budget, plan_fn=plan)
        report["ways_out"] = outs
        for line in outs:
            Console().print(f"  way out: {line}", highlight=False)
        raise PlanDoesNotFit(verdict.summary(outs), report)
    return report


def _print(report: dict, config: TrainConfig, task: str) -> None:
    console = Console()
    console.print(
        f"dry run: {task} of {config.model.preset or config.model.path} on mesh {report['mesh']} "
        f"({jax.devices()[0].platform}), global batch {config.data.batch_size} x {config.data.max_length}, "
        f"{config.micro_batches} micro-batch(es), {report['parameter_count'] / 1e9:.3f} B parameters trained"
        + (f" (LoRA; {report['frozen_count'] / 1e9:.3f} B frozen)" if report.get("frozen_count") else "")
    )
    table = Table(title="memory per device", title_justify="left")
    table.add_column("per device")
    table.add_column("GiB", justify="right")
    for key in (*PARTS, "total", "eval_temporaries", "eval_total"):
        if key in report:
            table.add_row(key, f"{report[key] / GIB:.3f}")
    console.print(table)
    console.print("temporaries: activations and workspace of the compiled step, as XLA planned them")
    console.print("largest arrays of the step, per device:", highlight=False)
    for array in report["largest_arrays"]:
        print(f"  {array['bytes'] / GIB:8.3f} GiB  {array['shape']:<28} {array['op']}")
    experts = report.get("experts")
    if experts:
        split = f"split over {', '.join(experts['axes'])}" if experts["axes"] else "not split"
        console.print(
            f"experts: {experts['tensors']} expert tensors, expert axis {split}: {experts['per_device']} of "
            f"{experts['num_experts']} experts per device; expert tensors not split by expert: "
            f"{', '.join(experts['unsplit']) or 'none'}",
            highlight=False,
        )
        if experts["grouped_matmul"] == "planned":
            console.print(
                "grouped matmuls planned with a stand-in of an accelerator kernel's memory (XLA:CPU's ragged_dot "
                "expands densely over all experts)",
                highlight=False,
            )
    if report["replicated_parameters"]:
        console.print(
            f"replicated: {report['replicated_parameters'] / GIB:.3f} GiB of parameters have no dimension that "
            f"divides over fsdp {report['mesh']['fsdp']} and sit whole on every device"
        )
