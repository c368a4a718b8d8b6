"""LoRA models built on a loaded base, in and out as peft folders, and merged into a plain model.

- ``add_adapters(model, config, seed=, mesh=)``: a plain decoder (the base, in
  ``config.base_param_dtype``) -> the LoRA model of ``config`` (fresh adapters;
  with ``weight_qtype``, the layer kernels quantized one parameter at a time,
  each original freed once its codes exist).
- ``save_peft_adapter(model, config, folder)`` writes ``adapter_config.json`` and
  ``adapter_model.safetensors`` with peft's key names
  (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[rank,
  in]``, ``lora_B.weight`` ``[out, rank]``), which
  ``peft.PeftModel.from_pretrained(base, folder)`` loads.
- ``read_peft_config(folder)`` checks a peft folder is a plain LoRA adapter we
  can train from (rank, alpha, dropout, targets) and ``load_peft_adapter(model,
  folder)`` puts its weights into a LoRA model's adapters, every key accounted for
  (a missing key is an error here; peft would only warn and keep the init).
- ``merge_lora(model, config) -> (model, config)``: the plain decoder whose
  kernels are ``W + (alpha / rank) A B`` (W dequantized for QLoRA: the merged
  model is the function that was trained), for ``save_hf`` and generation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxrlhf.models import lora
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.decoder import Decoder
from jaxrlhf.models.hf_io import to_host
from jaxrlhf.models.safetensors_folder import SafetensorsFile
from jaxrlhf.ops import quantize as quant
from jaxrlhf.parallel.rules import DEFAULT_RULES, Rules, annotate_out_sharding, partition_specs

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "add_adapters",
    "base_graphdef",
    "save_peft_adapter",
    "read_peft_config",
    "load_peft_adapter",
    "merge_lora",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _block(target: str) -> str:
    return "attn" if target in lora.ATTENTION_TARGETS else "mlp"


def base_graphdef(config: ModelConfig) -> nnx.GraphDef:
    """The graph of a LoRA model's base alone: merged with its frozen state, the model with the adapters off."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(dataclasses.replace(config, lora=None), rngs=nnx.Rngs(0))))[0]


def add_adapters(model: Decoder, config: ModelConfig, *, seed: int = 0, mesh=None, rules: Rules = DEFAULT_RULES) -> Decoder:
    """The LoRA model of ``config`` on the base ``model`` (consumed: quantized kernels free their originals)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed))))
    specs = None if mesh is None else dict(nnx.to_flat_state(partition_specs(abstract, mesh, rules)))
    sharding = lambda path: None if mesh is None else jax.sharding.NamedSharding(mesh, specs[path].get_value())  # noqa: E731
    flat_abstract = list(nnx.to_flat_state(abstract))
    adapter_paths = [path for path, v in flat_abstract if isinstance(v, nnx.LoRAParam)]

    def fresh_adapters():  # the whole decoder is traced, only its adapters are returned: XLA drops the rest
        state = dict(nnx.to_flat_state(nnx.state(Decoder(config, rngs=nnx.Rngs(seed)))))
        return [state[path][...] for path in adapter_paths]

    out_shardings = None if mesh is None else [sharding(p) for p in adapter_paths]
    adapters = dict(zip(adapter_paths, jax.jit(fresh_adapters, out_shardings=out_shardings)()))
    base = dict(nnx.to_flat_state(nnx.state(model)))
    values = {}
    for path, variable in flat_abstract:
        if path in adapters:
            values[path] = adapters[path]
        elif path[-1] == "codes":
            kernel = base[path[:-1]][...]
            # One layer at a time (lax.map): the temporaries of quantizing are one layer's, not the stack's.
            quantize = jax.jit(
                lambda w: jax.lax.map(lambda layer: quant.quantize(layer, config.weight_qtype), w),
                out_shardings=None if mesh is None else (sharding(path), sharding((*path[:-1], "scales"))),
            )
            values[path], values[(*path[:-1], "scales")] = quantize(kernel)
            kernel.delete()
        elif path[-1] != "scales":
            value = base[path][...]
            values[path] = value if value.dtype == variable.dtype else value.astype(variable.dtype)
    state = nnx.from_flat_state([(path, v.replace(values[path])) for path, v in flat_abstract])
    lora_model = nnx.merge(graphdef, state)
    if mesh is not None:
        annotate_out_sharding(lora_model, partition_specs(lora_model, mesh, rules))
    return lora_model


def _stacks(model: Decoder) -> list[tuple[object, tuple[int, ...]]]:
    """Each stack of layers (a ``Block``) with the layer index of each of its entries."""
    return [(getattr(model, name), ids) for name, ids in model.config.layer_stacks().items()]


def _adapters(model: Decoder) -> list[tuple[str, lora.Adapter, tuple[int, ...]]]:
    """(target, its adapters in one stack, the layer of each of their entries), stack by stack."""
    return [
        (t, getattr(getattr(block, _block(t)), f"{t}_lora"), ids)
        for block, ids in _stacks(model)
        for t in model.config.lora.targets
    ]


def _peft_names(target: str, layer: int) -> tuple[str, str]:
    module = _PREFIX + lora.hf_module_name(target, layer)
    return module + ".lora_A.weight", module + ".lora_B.weight"


def save_peft_adapter(model: Decoder, config: ModelConfig, folder: str | os.PathLike, *, base_model: str = "") -> None:
    """Write ``model``'s adapters as a peft LoRA folder (float32 weights). Every process must call it."""
    spec = config.lora
    if spec is None:
        raise ValueError("save_peft_adapter needs a model with LoRA adapters (model.lora)")
    tensors = {}
    for target, adapter, layer_ids in _adapters(model):
        a, b = to_host(adapter.a[...].astype(jnp.float32)), to_host(adapter.b[...].astype(jnp.float32))
        for j, i in enumerate(layer_ids):
            a_name, b_name = _peft_names(target, i)
            tensors[a_name] = np.ascontiguousarray(a[j].reshape(-1, spec.rank).T)
            tensors[b_name] = np.ascontiguousarray(b[j].reshape(spec.rank, -1).T)
    if jax.process_index() != 0:
        return
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")


def read_peft_config(folder: str | os.PathLike, *, num_layers: int, key: str = "model.lora.adapter_path") -> dict:
    """``{"rank", "alpha", "dropout", "targets"}`` of a peft LoRA folder; a ValueError naming ``key`` otherwise."""
    path = pathlib.Path(folder) / ADAPTER_CONFIG
    if not path.is_file() or not (pathlib.Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{key}: {folder} has no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a peft LoRA adapter folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: {path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{key}: {path} is not a JSON object")
    missing = [k for k in ("r", "lora_alpha") if not isinstance(config.get(k), (int, float))]
    if missing:
        raise ValueError(f"{key}: {path} has no number {' or '.join(missing)} (peft writes r and lora_alpha)")
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "bias": config.get("bias", "none") != "none",
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    bad = [f"{k}={config.get(k)!r}" for k, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"{key}: {path} is not a plain LoRA adapter this trainer can continue: {', '.join(bad)}")
    try:
        targets = lora.resolve_targets(config.get("target_modules") or [], num_layers)
    except ValueError as e:
        raise ValueError(f"{key}: {path}: {e}") from None
    return {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]), "dropout": float(config.get("lora_dropout", 0.0)),
            "targets": targets}  # fmt: skip


def load_peft_adapter(model: Decoder, folder: str | os.PathLike, *, key: str = "model.lora.adapter_path") -> Decoder:
    """``model`` with its adapters set from a peft folder (sharded as they were); every key must be present."""
    config = model.config
    path = pathlib.Path(folder) / ADAPTER_WEIGHTS
    file = SafetensorsFile(path)  # ours, not safetensors.numpy: that cannot read the bf16 adapters peft often saves
    stripped = {name.replace(".default.", "."): file.tensor(name) for name in file.header}
    expected, problems = set(), []
    for target, adapter, layer_ids in _adapters(model):
        a_shape, b_shape = adapter.a.shape, adapter.b.shape
        a_rows, b_rows = [], []
        for i in layer_ids:
            a_name, b_name = _peft_names(target, i)
            expected |= {a_name, b_name}
            a_want, b_want = (config.lora.rank, int(np.prod(a_shape[1:-1]))), (int(np.prod(b_shape[2:])), config.lora.rank)
            for name, want, rows in ((a_name, a_want, a_rows), (b_name, b_want, b_rows)):
                if name not in stripped:
                    problems.append(f"missing {name}")
                elif tuple(stripped[name].shape) != want:
                    problems.append(f"{name} has shape {tuple(stripped[name].shape)}, this model needs {want}")
                else:
                    rows.append(stripped[name])
        if problems:
            continue
        a = np.stack([r.T.reshape(a_shape[1:]) for r in a_rows])
        b = np.stack([r.T.reshape(b_shape[1:]) for r in b_rows])
        adapter.a[...] = jax.device_put(a.astype(adapter.a.dtype), adapter.a[...].sharding)
        adapter.b[...] = jax.device_put(b.astype(adapter.b.dtype), adapter.b[...].sharding)
    unexpected = sorted(set(stripped) - expected)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if problems:
        raise ValueError(
            f"{key}: {path} does not fit this {config.model_type} model ({config.num_layers} layers, "
            f"hidden {config.hidden_size}): {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}"
        )
    return model


@functools.partial(jax.jit, static_argnames=("qtype", "scaling", "dtype"))
def _merged_kernel(kernel, a, b, *, qtype: str, scaling: float, dtype) -> jax.Array:
    """``W + scaling * A B`` of one stacked kernel (``kernel``: the weight, or its ``(codes, scales)``), a layer
    at a time so that only one layer's float32 temporaries exist."""

    def one_layer(args):
        w, a, b = args
        w = quant.dequantize(*w, qtype, jnp.float32) if qtype != "none" else w.astype(jnp.float32)
        if a is not None:
            rank = a.shape[-1]
            delta = a.astype(jnp.float32).reshape(-1, rank) @ b.astype(jnp.float32).reshape(rank, -1)
            w = w + scaling * delta.reshape(w.shape)
        return w.astype(dtype)

    return jax.lax.map(one_layer, (kernel, a, b))


def merge_lora(model: Decoder, config: ModelConfig, *, dtype=None) -> tuple[Decoder, ModelConfig]:
    """The plain decoder (no adapters, float kernels) computing what ``model`` computes with its adapters on.

    Kernels come out in ``dtype`` (default: the checkpoint's dtype, else the compute
    dtype: a float32 merge of a 8B model would be twice the bf16 base it came from);
    the other parameters keep theirs. Placement follows the inputs.
    """
    if config.lora is None and config.weight_qtype == "none":
        return model, config
    dtype = jnp.dtype(dtype or config.checkpoint_dtype or config.dtype)
    plain = dataclasses.replace(config, lora=None, weight_qtype="none")
    merged = nnx.eval_shape(lambda: Decoder(plain, rngs=nnx.Rngs(0)))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    for path, variable in nnx.to_flat_state(nnx.state(merged)):
        if path[-1] not in lora.TARGETS:
            variable.set_value(source[path][...])
    for stack in config.layer_stacks():
        for name in lora.TARGETS:
            parent = getattr(getattr(model, stack), _block(name))
            kernel, adapter = getattr(parent, name), getattr(parent, f"{name}_lora", None)
            quantized = isinstance(kernel, lora.QuantizedKernel)
            weight = (kernel.codes[...], kernel.scales[...]) if quantized else kernel[...]
            a, b = (None, None) if adapter is None else (adapter.a[...], adapter.b[...])
            scaling = config.lora.scaling if config.lora is not None else 0.0
            qtype = kernel.qtype if quantized else "none"
            w = _merged_kernel(weight, a, b, qtype=qtype, scaling=scaling, dtype=dtype)
            getattr(getattr(getattr(merged, stack), _block(name)), name).set_value(w)
    return merged, plain
