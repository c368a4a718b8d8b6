"""Hugging Face checkpoints in and out: ``load_hf`` and ``save_hf``.

Only safetensors are read (never a pickle, never remote code). ``load_hf`` builds
the model abstractly, then fills each parameter straight into its target
sharding with ``jax.make_array_from_callback``: every device shard is read from
a memory map of the checkpoint file, so the host holds at most one parameter's
shards at a time, and a process only reads the shards its devices own.

``save_hf`` writes what ``transformers.AutoModelForCausalLM.from_pretrained``
loads without missing or unexpected keys: safetensors (split into
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` above
``max_shard_size``), config.json, generation_config.json whose EOS ids include
the chat template's end-of-turn token (so generation stops at the end of a
turn), and the tokenizer. In a multi-process run every process must call it
(parameters are gathered collectively) and process 0 writes.

The name map, ``HF_NAME_MAPS[model_type]``, lives in ``models.hf_names``; MoE
experts, fused in memory and saved per expert, are read and written by ``models.moe_io``.

A multimodal Gemma 3 checkpoint (``Gemma3ForConditionalGeneration``) loads as
its language model: the text tower's tensors under ``model.language_model.``
(transformers 5) or ``language_model.model.`` (the Hub's files), the vision
tower and projector skipped with a logged note; ``save_hf`` then writes the
text-only ``Gemma3ForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from safetensors.numpy import save_file

from jaxrlhf.models import moe_io
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.hf_config import config_from_hf, config_to_hf, text_config
from jaxrlhf.models.hf_names import HF_NAME_MAPS, TensorMap
from jaxrlhf.models.decoder import Decoder
from jaxrlhf.models.safetensors_folder import INDEX_FILE, SINGLE_FILE, SafetensorsFolder
from jaxrlhf.parallel.rules import DEFAULT_RULES, Rules, annotate_out_sharding, partition_specs

__all__ = ["HF_NAME_MAPS", "TensorMap", "load_hf", "save_hf", "end_of_turn_token_id", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = 5 * 2**30  # bytes per safetensors file, as transformers' save_pretrained


# Where a multimodal Gemma 3 checkpoint keeps its language model, and what else it holds (skipped).
_LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "language_model.model.")
_OTHER_TOWERS = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")
_log = logging.getLogger(__name__)
# Tensors some checkpoints carry that are derived, not learned: safe to skip.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

def _entries(config: ModelConfig, state: nnx.State, prefix: str = "model.") -> list[tuple[TensorMap, nnx.Variable]]:
    """The name-map entries for the parameters this config's model has, paired with its Variables (``prefix``:
    where the checkpoint keeps the ``model.`` tensors)."""
    variables = dict(nnx.to_flat_state(state))
    stacks = config.layer_stacks()
    table = [
        dataclasses.replace(
            entry,
            hf=prefix + entry.hf.removeprefix("model.") if entry.hf.startswith("model.") else entry.hf,
            layer_ids=stacks.get(entry.ours[0], ()),
        )
        for entry in HF_NAME_MAPS[config.model_type]
    ]
    entries = [(entry, variables[entry.ours]) for entry in table if entry.ours in variables]
    unmapped = set(variables) - {entry.ours for entry, _ in entries}
    if unmapped:  # a model parameter without an HF name would silently stay random
        raise ValueError(f"no HF name for parameters {sorted(unmapped)} of model_type {config.model_type!r}")
    return entries


def _hf_names(entry: TensorMap, variable: nnx.Variable) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor behind one of our parameters (one per layer if stacked)."""
    if entry.experts:
        return moe_io.expert_hf_names(entry, variable)
    if entry.stacked:
        shape = entry.hf_shape(variable.shape[1:])
        return [(entry.name(j), shape) for j in range(variable.shape[0])]
    return [(entry.hf, entry.hf_shape(variable.shape))]


def _language_model_prefix(checkpoint: SafetensorsFolder, folder: pathlib.Path) -> tuple[str, list[str]]:
    """(prefix of the language model's tensors, the other towers' tensor names) of a multimodal Gemma 3 folder."""
    names = list(checkpoint.location)
    for prefix in _LANGUAGE_MODEL_PREFIXES:
        if any(name.startswith(prefix) for name in names):
            return prefix, [name for name in names if name.startswith(_OTHER_TOWERS)]
    raise ValueError(f"checkpoint {folder} holds no language model tensors under {' or '.join(_LANGUAGE_MODEL_PREFIXES)}")


def _check_names(
    entries, checkpoint: SafetensorsFolder, config: ModelConfig, folder: pathlib.Path, skipped: Sequence[str] = ()
) -> None:
    expected = dict(name_and_shape for entry, v in entries for name_and_shape in _hf_names(entry, v))
    available = set(checkpoint.location) - set(skipped)
    missing = sorted(set(expected) - available)
    unexpected = sorted(
        name
        for name in available - set(expected)
        if not name.endswith(_IGNORED_SUFFIXES)
        # tied checkpoints sometimes store the (identical) head as well
        and not (config.tie_word_embeddings and name in ("lm_head.weight", "language_model.lm_head.weight"))
    )
    wrong_shape = [
        f"{name}: {checkpoint.shape(name)} != {shape}"
        for name, shape in expected.items()
        if name in available and checkpoint.shape(name) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {'; '.join(wrong_shape)}")
    if problems:
        raise ValueError(
            f"checkpoint {folder} does not match its config.json (model_type {config.model_type!r}, "
            f"{config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}, "
            f"qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}): " + "; ".join(problems)
        )


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _reader(entry: TensorMap, shape: tuple[int, ...], dtype: np.dtype, checkpoint: SafetensorsFolder) -> Callable:
    """Callback for make_array_from_callback: the block ``index`` of our parameter, read from the checkpoint."""
    cache: dict[tuple, np.ndarray] = {}  # replicated shards ask for the same block on several devices

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = _index_key(index)
        if key not in cache:
            if entry.experts:
                cache[key] = moe_io.expert_block(entry, shape, index, dtype, checkpoint)
            elif entry.stacked:
                layers = range(shape[0])[index[0]]
                block_shape = [len(range(size)[s]) for size, s in zip(shape, index)]
                block = np.empty(block_shape, dtype)
                for j, i in enumerate(layers):  # converted layer by layer straight into the block
                    block[j] = entry.to_ours(checkpoint.tensor(entry.name(i)), shape[1:])[index[1:]]
                cache[key] = block
            else:
                cache[key] = np.asarray(entry.to_ours(checkpoint.tensor(entry.hf), shape)[index], dtype=dtype)
        return cache[key]

    return read


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    param_dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    remat: str = "none",
    scan_layers: bool = True,
    attention_impl: str = "xla",
    sequence_parallel: bool = False,
) -> tuple[Decoder, ModelConfig]:
    """Load a local HF folder (config.json + safetensors) as ``(Decoder, ModelConfig)``.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the
    parameters. With ``mesh``, each parameter lands directly in the sharding
    ``rules`` give it (and records it as ``out_sharding`` metadata); without,
    parameters are ordinary arrays on the default device.
    """
    folder = pathlib.Path(path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: load_hf reads a local Hugging Face model folder")
    hf_config = json.loads(config_file.read_text())
    multimodal = text_config(hf_config) is not hf_config
    config = config_from_hf(
        hf_config,
        dtype=jnp.dtype(dtype).name,
        param_dtype=jnp.dtype(param_dtype).name,
        remat=remat,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
        sequence_parallel=sequence_parallel,
    )
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    checkpoint = SafetensorsFolder(folder)
    prefix, skipped = _language_model_prefix(checkpoint, folder) if multimodal else ("model.", [])
    entries = _entries(config, abstract, prefix)
    _check_names(entries, checkpoint, config, folder, skipped)
    if multimodal:
        _log.warning(
            "%s: loading the language model of %s; skipped %d vision tower and projector tensors",
            folder, hf_config.get("architectures"), len(skipped),
        )  # fmt: skip
    specs = None if mesh is None else dict(nnx.to_flat_state(partition_specs(abstract, mesh, rules)))
    loaded = []
    for entry, variable in entries:
        shape, np_dtype = tuple(variable.shape), np.dtype(variable.dtype)
        read = _reader(entry, shape, np_dtype, checkpoint)
        if mesh is None:
            value = jnp.asarray(read((slice(None),) * len(shape)))
        else:
            sharding = NamedSharding(mesh, specs[entry.ours].get_value())
            value = jax.make_array_from_callback(shape, sharding, read)
        loaded.append((entry.ours, variable.replace(value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
    if mesh is not None:
        annotate_out_sharding(model, partition_specs(model, mesh, rules))
    return model, config


@functools.partial(jax.jit, static_argnums=2)
def _layer_slice(stacked: jax.Array, layer: jax.Array, dtype: np.dtype) -> jax.Array:
    # A traced layer index: one compilation per parameter shape, not per layer.
    return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False).astype(dtype)


def to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(entries, dtype: np.dtype) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(name, shape, fetch) for every HF tensor: the unstacked parameters, then layer by layer (in HF order,
    each layer from its stack)."""
    by_layer: dict[int, list] = {}
    for entry, v in entries:
        if not entry.stacked:
            yield entry.hf, entry.hf_shape(v.shape), lambda e=entry, v=v: e.to_hf(to_host(v[...].astype(dtype)))
            continue
        for j in range(v.shape[0]):
            by_layer.setdefault(entry.layer_ids[j] if entry.layer_ids else j, []).append((entry, v, j))
    for layer in sorted(by_layer):
        for entry, v, j in by_layer[layer]:
            if entry.experts:
                yield from moe_io.expert_tensors(entry, v, j, dtype, to_host)
                continue
            yield (
                entry.name(j),
                entry.hf_shape(v.shape[1:]),
                lambda e=entry, v=v, j=j: e.to_hf(to_host(_layer_slice(v[...], jnp.int32(j), dtype))),
            )


def _plan_shards(tensors, itemsize: int, max_shard_size: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = math.prod(tensor[1]) * itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message (e.g. ``<|im_end|>``).

    Found by rendering a one-turn conversation and tokenising what follows the
    assistant's text; None without a chat template or if no special token follows.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "ZQXJ_END_OF_TURN_PROBE"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    following = tokenizer.encode(text[text.index(marker) + len(marker) :], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return following[0] if following and following[0] in special else None


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return tokenizer


def save_hf(
    model: Decoder,
    model_config: ModelConfig,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    dtype: Any = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Write ``model`` as an HF folder loadable by ``AutoModelForCausalLM.from_pretrained``.

    ``tokenizer``: an HF tokenizer or a local tokenizer folder (saved alongside;
    its EOS and end-of-turn tokens go into generation_config.json). ``dtype`` of
    the saved weights defaults to the dtype of the checkpoint the model was
    loaded from, else ``param_dtype``. Existing weight files in ``path`` are replaced.
    """
    if model_config.lora is not None or model_config.weight_qtype != "none":
        raise ValueError("save_hf writes plain models: merge the LoRA adapters first (models.merge_lora)")
    folder = pathlib.Path(path)
    save_dtype = jnp.dtype(dtype or model_config.checkpoint_dtype or model_config.param_dtype)
    entries = _entries(model_config, nnx.state(model))
    shards = _plan_shards(list(_hf_tensors(entries, save_dtype)), save_dtype.itemsize, max_shard_size)
    tokenizer = _load_tokenizer(tokenizer)
    writer = jax.process_index() == 0
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
            stale.unlink(missing_ok=True)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for file_name, shard in zip(names, shards):
        tensors = {name: fetch() for name, _, fetch in shard}  # every process joins the gathers
        if writer:
            save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
    if not writer:
        return
    if len(shards) > 1:
        total = sum(math.prod(shape) for shard in shards for _, shape, _ in shard) * save_dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_config = config_to_hf(model_config, dtype=save_dtype.name)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    eos_ids = list(model_config.eos_token_id)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        eos_ids += [tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
    generation = {
        "bos_token_id": model_config.bos_token_id,
        "eos_token_id": eos_ids,
        "pad_token_id": model_config.pad_token_id,
    }
    (folder / "generation_config.json").write_text(
        json.dumps({k: v for k, v in generation.items() if v not in (None, [])}, indent=2) + "\n"
    )
