"""LoRA and QLoRA against peft and transformers (torch CPU, float32) and a float64 numpy quantizer.

References: peft's own LoRA layers reading the adapter folders we write (and
writing the ones we read), transformers' forward on merged or dequantized
weights, and a numpy quantize-dequantize written here from the format's
definition; never the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from model_fixtures import VOCAB, HFZoo

from jaxrlhf.models import LoraSpec, add_adapters, load_hf, load_peft_adapter, merge_lora, save_hf, save_peft_adapter
from jaxrlhf.models.lora import TARGETS, QuantizedKernel, resolve_targets
from jaxrlhf.models.lora_io import read_peft_config

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TOL = 1e-4
# Two architectures: qwen2 (q/k/v bias, tied head, a sliding-window layer) with adapters on some projections
# (the others of each block stay plain), qwen3 (q/k norm after the adapted q/k, head_dim != hidden / heads,
# untied head) with adapters on all seven. Each (architecture, targets) pair costs a cold compile of the
# adapters' init (~10 s on a 2-core CPU: XLA's threefry), so the tests share these two, and one alpha.
SOME = ("q_proj", "v_proj", "o_proj", "down_proj")
ALPHA = 16.0  # scaling alpha / rank = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> HFZoo:
    return HFZoo(tmp_path_factory.mktemp("peft_zoo"))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)


@nnx.jit
def _logits(model, tokens):
    return model(tokens) @ model.lm_head_matrix()


def _ours(model, tokens) -> np.ndarray:
    return np.asarray(_logits(model, jnp.asarray(tokens))).astype(np.float64)


def _hf(folder):
    """A fresh transformers model (peft injects its layers in place, so never a shared one)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _torch_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_less(np.abs(got - want).max(), TOL)


def _lora_model(folder, spec: LoraSpec, weight_qtype: str = "none"):
    """Our LoRA model on the HF base in ``folder`` (f32), with fresh adapters."""
    base, config = load_hf(folder, dtype=jnp.float32, param_dtype=jnp.float32)
    config = dataclasses.replace(config, lora=spec, weight_qtype=weight_qtype)
    return add_adapters(base, config, seed=1), config


def _randomize_adapters(model, seed: int) -> None:
    """Non-zero A and B (B starts at zero), large enough that the update moves the logits by O(1)."""
    rng = np.random.default_rng(seed)
    for target in model.config.lora.targets:
        adapter = getattr(model.layers.attn if target in ATTENTION else model.layers.mlp, f"{target}_lora")
        adapter.a.set_value(jnp.asarray(rng.normal(0, 0.15, adapter.a.shape), jnp.float32))
        adapter.b.set_value(jnp.asarray(rng.normal(0, 0.15, adapter.b.shape), jnp.float32))


def _check_peft_loaded_everything(peft_model, folder, targets, num_layers: int) -> None:
    """peft only warns about keys it did not find: every adapter tensor it holds (names without the adapter
    name) must be in our file with the file's values, and every tensor of the file must be used."""
    loaded = {
        name.replace(".default", ""): value.numpy()
        for name, value in peft_model.state_dict().items()
        if ".lora_A." in name or ".lora_B." in name
    }
    written = safetensors.numpy.load_file(folder / "adapter_model.safetensors")
    assert sorted(loaded) == sorted(written)
    assert len(written) == 2 * len(targets) * num_layers
    for name, value in written.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    peft_config = peft_model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, set(peft_config.target_modules)) == (4, ALPHA, set(targets))


# Export: our adapter folder in peft, and the merged model in transformers.


@pytest.mark.parametrize("variant, targets", [("qwen2", SOME), ("qwen3", TARGETS)])
def test_saved_adapter_loads_in_peft_with_our_logits_and_merges(zoo, tokens, variant, targets, tmp_path):
    import peft

    base_folder = zoo.folder(variant)
    model, config = _lora_model(base_folder, LoraSpec(rank=4, alpha=ALPHA, targets=targets))
    _close(_ours(model, tokens), zoo.logits(variant, tokens))  # fresh adapters change nothing
    _randomize_adapters(model, seed=len(variant))
    ours = _ours(model, tokens)
    save_peft_adapter(model, config, tmp_path / "adapter", base_model=str(base_folder))

    peft_model = peft.PeftModel.from_pretrained(_hf(base_folder), tmp_path / "adapter").eval()
    _check_peft_loaded_everything(peft_model, tmp_path / "adapter", targets, config.num_layers)

    reference = _torch_logits(peft_model, tokens)
    assert np.abs(reference - zoo.logits(variant, tokens)).max() > 0.5  # the adapters matter
    _close(ours, reference)

    # Merged == unmerged: our merged model through save_hf in plain transformers, and peft's own merge.
    merged, plain = merge_lora(model, config)
    assert plain.lora is None and plain.weight_qtype == "none"
    save_hf(merged, plain, tmp_path / "merged")
    _close(_torch_logits(_hf(tmp_path / "merged"), tokens), reference)
    _close(_torch_logits(peft_model.merge_and_unload(), tokens), reference)


# Import: an adapter folder that peft wrote.


@pytest.mark.parametrize(
    "variant, target_modules, targets",
    [
        ("qwen2", ["self_attn.q_proj", "v_proj", "o_proj", "mlp.down_proj"], SOME),
        ("qwen2", r"model\.layers\.\d+\.(self_attn\.[qvo]|mlp\.down)_proj", SOME),
        ("qwen3", "all-linear", TARGETS),  # peft saves it as the full names of the 14 modules
    ],
)
def test_adapter_written_by_peft_gives_peft_logits(zoo, tokens, variant, target_modules, targets, tmp_path):
    import peft
    import torch

    torch.manual_seed(3)
    lora_config = peft.LoraConfig(r=4, lora_alpha=ALPHA, target_modules=target_modules, init_lora_weights=False)
    peft_model = peft.get_peft_model(_hf(zoo.folder(variant)), lora_config).eval()  # random A and B
    peft_model.save_pretrained(tmp_path)
    reference = _torch_logits(peft_model, tokens)
    assert np.abs(reference - zoo.logits(variant, tokens)).max() > 0.5

    found = read_peft_config(tmp_path, num_layers=zoo.torch_model(variant).config.num_hidden_layers)
    assert found == {"rank": 4, "alpha": ALPHA, "dropout": 0.0, "targets": targets}
    model, _ = _lora_model(zoo.folder(variant), LoraSpec(**found))
    model = load_peft_adapter(model, tmp_path)
    _close(_ours(model, tokens), reference)


# Bad input: one-line ValueErrors naming the config key to fix.


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as error:
        fn(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_bad_adapters_and_targets_are_one_line_errors(zoo, tmp_path):
    model, config = _lora_model(zoo.folder("qwen2"), LoraSpec(rank=4, alpha=ALPHA, targets=SOME))  # hidden 64
    save_peft_adapter(model, config, tmp_path / "good")
    load_peft_adapter(model, tmp_path / "good")  # the control: its own folder loads
    good = safetensors.numpy.load_file(tmp_path / "good" / "adapter_model.safetensors")

    def folder_with(name: str, tensors: dict) -> pathlib.Path:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        safetensors.numpy.save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        return folder

    # An adapter of a wider model (hidden 96 for 64), of a deeper one (3 layers), one with a key missing.
    wider = {k: np.zeros([96 if n == 64 else n for n in v.shape], np.float32) for k, v in good.items()}
    message = _raises("model.lora.adapter_path", load_peft_adapter, model, folder_with("wider", wider))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape (4, 96)" in message
    assert "this model needs (4, 64)" in message
    deeper = {**good, **{k.replace("layers.1.", "layers.2."): v for k, v in good.items() if "layers.1." in k}}
    message = _raises("model.lora.adapter_path", load_peft_adapter, model, folder_with("deeper", deeper))
    assert "8 unexpected tensors (e.g. base_model.model.model.layers.2." in message
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    missing = folder_with("missing", {k: v for k, v in good.items() if k != name})
    message = _raises("model.lora.adapter_path", load_peft_adapter, model, missing)
    assert f"missing {name}" in message

    no_config = tmp_path / "no_config"
    shutil.copytree(tmp_path / "good", no_config)
    (no_config / "adapter_config.json").unlink()
    _raises("model.lora.adapter_path.*adapter_config.json", read_peft_config, no_config, num_layers=2)

    adapter_config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    for key, value in [("use_dora", True), ("layers_to_transform", [0]), ("bias", "all")]:
        (tmp_path / "good" / "adapter_config.json").write_text(json.dumps({**adapter_config, key: value}))
        _raises(f"model.lora.adapter_path.*{key}=", read_peft_config, tmp_path / "good", num_layers=2)
    (tmp_path / "good" / "adapter_config.json").write_text(json.dumps({**adapter_config, "target_modules": ["qkv"]}))
    _raises("model.lora.adapter_path.*model.lora.target_modules", read_peft_config, tmp_path / "good", num_layers=2)

    _raises(r"model\.lora\.target_modules \['qkv'\]", resolve_targets, ["qkv"], 2)
    _raises(r"model\.lora\.target_modules regex .* matches no linear layer", resolve_targets, r".*\.qkv_proj", 2)
    _raises(r"model\.lora\.target_modules .* some layers only", resolve_targets, r"model\.layers\.0\..*_proj", 2)
    _raises(r"model\.lora\.rank must be > 0", LoraSpec, rank=0, alpha=1.0)
    # peft's semantics on the good cases: suffixes of module names, full-match regexes, all-linear.
    assert resolve_targets(["self_attn.q_proj", "down_proj"], 2) == ("q_proj", "down_proj")
    assert resolve_targets(r".*\.(v|o)_proj", 2) == ("v_proj", "o_proj")
    assert resolve_targets("all-linear", 2) == TARGETS
    full_names = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("k_proj", "q_proj")]
    assert resolve_targets(full_names, 2) == ("q_proj", "k_proj")  # how peft saves a small model's all-linear
    _raises(r"model\.lora\.target_modules .* q_proj, k_proj in some layers only", resolve_targets, full_names[:2], 2)


# QLoRA: the quantized base is the dequantized weights, computed here in float64 numpy.


def _nf4_levels() -> np.ndarray:
    """NormalFloat4 from its definition (QLoRA): 8 positive and 7 negative normal quantiles and 0, in [-1, 1]."""
    from statistics import NormalDist

    offset, quantile = 0.9677083, NormalDist().inv_cdf
    positive = [quantile(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-quantile(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative))
    return levels / np.abs(levels).max()


def _fake_quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """``w`` quantized and dequantized, blockwise absmax over its last axis (blocks of gcd(64, n))."""
    block = math.gcd(64, w.shape[-1])
    blocks = w.astype(np.float64).reshape(*w.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    normed = blocks / np.where(absmax == 0, 1, absmax)
    if qtype == "int8":
        values = np.round(127 * normed) / 127
    else:
        levels = _nf4_levels()
        values = levels[np.abs(normed[..., None] - levels).argmin(-1)]
    return (values * absmax).reshape(w.shape)


def _dequantized_folder(source, folder, qtype: str, hf_config) -> None:
    """A copy of the HF folder ``source`` whose layer projections are fake-quantized in our kernel layout.

    Ours are ``[in..., out...]`` with heads split out: q/k/v ``[D, heads, head_dim]``, o ``[heads, head_dim,
    D]``, the MLP ``[in, out]``; HF's are ``[out, in]``. Blocks run along our last axis.
    """
    d = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or d // hf_config.num_attention_heads
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    changed = 0
    for name, w in tensors.items():
        kind = name.split(".")[-2]
        if not name.endswith(".weight") or kind not in TARGETS:
            continue
        ours = w.T  # [in, out]
        if kind in ("q_proj", "k_proj", "v_proj"):
            ours = ours.reshape(d, -1, head_dim)
        elif kind == "o_proj":
            ours = ours.reshape(-1, head_dim, d)
        tensors[name] = np.ascontiguousarray(_fake_quantize(ours, qtype).reshape(w.T.shape).T.astype(np.float32))
        changed += 1
    assert changed == len(TARGETS) * hf_config.num_hidden_layers
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("variant, qtype, targets", [("qwen2", "int8", SOME), ("qwen3", "nf4", TARGETS)])
def test_qlora_logits_are_the_dequantized_models(zoo, tokens, variant, qtype, targets, tmp_path):
    import peft

    _dequantized_folder(zoo.folder(variant), tmp_path / "dequantized", qtype, zoo.torch_model(variant).config)
    dequantized = _torch_logits(_hf(tmp_path / "dequantized"), tokens)
    # Quantization moves the logits far beyond the tolerance (so does quantizing blocks along HF's input axis
    # instead of our last one: by 0.1 to 1 here), so the comparisons below see the layout.
    assert np.abs(dequantized - zoo.logits(variant, tokens)).max() > (0.01 if qtype == "int8" else 0.1)

    model, config = _lora_model(zoo.folder(variant), LoraSpec(rank=4, alpha=ALPHA, targets=targets), qtype)
    for block, name in [("attn", "k_proj"), ("attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")]:
        kernel = getattr(getattr(model.layers, block), name)
        assert isinstance(kernel, QuantizedKernel) and kernel.qtype == qtype, name
    _close(_ours(model, tokens), dequantized)  # B = 0: the quantized base alone
    _randomize_adapters(model, seed=7)
    ours = _ours(model, tokens)
    save_peft_adapter(model, config, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(_hf(tmp_path / "dequantized"), tmp_path / "adapter").eval()
    _check_peft_loaded_everything(peft_model, tmp_path / "adapter", targets, config.num_layers)
    reference = _torch_logits(peft_model, tokens)
    assert np.abs(reference - dequantized).max() > 0.5
    _close(ours, reference)

    # Merging dequantizes the base: the merged float model computes what was trained.
    merged, plain = merge_lora(model, config)
    save_hf(merged, plain, tmp_path / "merged")
    _close(_torch_logits(_hf(tmp_path / "merged"), tokens), reference)
