"""Parity with transformers (torch CPU) for every architecture, and HF checkpoint I/O.

References are transformers' own forward passes on the same weights, and
float64 numpy log-softmax; never the code under test.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from model_fixtures import HF_VARIANTS, VOCAB, HFZoo, make_chat_tokenizer, reference_token_logprobs, tiny_config

from jaxrlhf.models import init_model, load_hf, save_hf, token_logprobs
from jaxrlhf.parallel import MeshConfig, make_mesh

_ZOO: HFZoo | None = None


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> HFZoo:
    global _ZOO
    if _ZOO is None:
        _ZOO = HFZoo(tmp_path_factory.mktemp("hf_zoo"))
    return _ZOO


@pytest.fixture(scope="session")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)


@nnx.jit(static_argnames="chunk_size")
def _logits_and_logprobs(model, tokens, segment_ids, chunk_size):
    logits = model.logits(model(tokens, segment_ids=segment_ids))
    return logits, token_logprobs(model, tokens, segment_ids=segment_ids, chunk_size=chunk_size)


def _run(model, tokens, segment_ids=None, chunk_size=5):
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    logits, lp = _logits_and_logprobs(model, jnp.asarray(tokens), segment_ids, chunk_size)
    return np.asarray(logits), np.asarray(lp)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_logits_and_logprobs_match_transformers(zoo, tokens, variant):
    model, config = load_hf(zoo.folder(variant), dtype=jnp.float32)
    reference = zoo.logits(variant, tokens)
    assert reference.std() > 0.5  # the weights are large enough for the comparison to bite
    # Without segment ids (causal only) and with one segment per row (the segment mask path).
    for segment_ids in (None, np.ones_like(tokens)):
        logits, lp = _run(model, tokens, segment_ids)
        np.testing.assert_array_less(np.abs(logits - reference).max(), 1e-4)
        np.testing.assert_array_less(np.abs(lp - reference_token_logprobs(reference, tokens)).max(), 1e-4)
    assert lp.dtype == np.float32 and config.param_dtype == "float32"


@pytest.mark.parametrize(
    "variant, attention_impl",
    [(v, "xla") for v in HF_VARIANTS] + [("qwen2", "splash"), ("qwen3", "pallas_gpu")]
    + [("gemma2", "splash"), ("gemma2", "pallas_gpu"), ("gemma3", "splash"), ("gemma3", "pallas_gpu")]
    + [("qwen2", "blockwise")],
)  # fmt: skip
def test_packed_row_matches_transformers_run_separately(zoo, variant, attention_impl):
    """Two examples plus padding in one row: per-token log-probs equal each example's own HF run, with XLA's
    dense mask and with the flash kernels (interpret mode; qwen2 has biases and a sliding-window layer, qwen3
    q/k norms; gemma2 soft-caps attention, which splash applies and pallas_gpu hands to blockwise, and gemma3
    has per-layer-type RoPE and sliding layers, which pallas_gpu hands to blockwise)."""
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, VOCAB, (1, 7)), rng.integers(0, VOCAB, (1, 6))
    row = np.concatenate([first, second, np.zeros((1, 3), np.int64)], axis=1).astype(np.int32)
    segment_ids = np.array([[1] * 7 + [2] * 6 + [0] * 3], np.int32)
    model, _ = load_hf(zoo.folder(variant), dtype=jnp.float32, attention_impl=attention_impl)
    _, lp = _run(model, row, segment_ids)
    expected = np.concatenate(
        [
            reference_token_logprobs(zoo.logits(variant, first), first),
            reference_token_logprobs(zoo.logits(variant, second), second),
            np.zeros((1, 3)),
        ],
        axis=1,
    )
    np.testing.assert_allclose(lp, expected, atol=1e-4)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_save_hf_reloads_in_transformers_with_identical_logits(zoo, tokens, variant, tmp_path, capfd):
    import transformers

    model, config = load_hf(zoo.folder(variant), dtype=jnp.float32)
    tokenizer = make_chat_tokenizer()
    save_hf(model, config, tmp_path, tokenizer=tokenizer)
    capfd.readouterr()
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    output = capfd.readouterr()
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert "missing" not in (output.out + output.err).lower()
    assert "unexpected" not in (output.out + output.err).lower()
    import torch

    with torch.no_grad():
        logits = reloaded(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()
    np.testing.assert_array_equal(logits, zoo.logits(variant, tokens))
    original = zoo.torch_model(variant).config
    keys = ("rope_parameters", "tie_word_embeddings", "head_dim", "num_key_value_heads", "rms_norm_eps")
    for key in (*keys, "layer_types", "sliding_window", "attention_bias", "mlp_bias"):
        if hasattr(original, key):  # Qwen2Config, e.g., has no head_dim
            assert getattr(reloaded.config, key) == getattr(original, key), key

    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert tokenizer.eos_token_id in eos
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template


def test_sharded_checkpoints_both_ways(zoo, tokens, tmp_path):
    """A sharded HF checkpoint loads; save_hf shards above max_shard_size and transformers reads that back."""
    import torch
    import transformers

    hf_sharded = tmp_path / "hf_sharded"
    zoo.torch_model("qwen3").save_pretrained(hf_sharded, max_shard_size="100KB")
    assert len(json.loads((hf_sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(hf_sharded.glob("*.safetensors"))) > 1
    model, config = load_hf(hf_sharded, dtype=jnp.float32)
    logits, _ = _run(model, tokens)
    np.testing.assert_array_less(np.abs(logits - zoo.logits("qwen3", tokens)).max(), 1e-4)

    ours_sharded = tmp_path / "ours_sharded"
    save_hf(model, config, ours_sharded, max_shard_size=100_000)
    index = json.loads((ours_sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in ours_sharded.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for f in files for v in safetensors.numpy.load_file(ours_sharded / f).values()
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours_sharded, attn_implementation="eager")
    with torch.no_grad():
        reloaded_logits = reloaded(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()
    np.testing.assert_array_equal(reloaded_logits, zoo.logits("qwen3", tokens))
    again, _ = load_hf(ours_sharded, dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(model))

    # Saving a smaller model into the same folder leaves no stale shards behind.
    save_hf(model, config, ours_sharded)
    assert sorted(p.name for p in ours_sharded.glob("*.safetensors")) == ["model.safetensors"]
    assert not (ours_sharded / "model.safetensors.index.json").exists()


def test_load_hf_onto_mesh_streams_into_shards(zoo, tokens):
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    model, _ = load_hf(zoo.folder("llama2"), dtype=jnp.float32, mesh=mesh)
    # 4 query heads split over tensor=4; the 2 KV heads do not divide by 4 and stay whole.
    assert model.layers.attn.q_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert model.layers.attn.k_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    assert model.lm_head[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert model.layers.attn.q_proj.get_metadata()["out_sharding"] == (None, "fsdp", "tensor", None)
    with jax.set_mesh(mesh):
        logits, _ = _run(model, tokens)
    np.testing.assert_array_less(np.abs(logits - zoo.logits("llama2", tokens)).max(), 1e-4)


def test_bf16_checkpoint_and_bf16_compute(zoo, tokens, tmp_path):
    import torch
    import transformers

    # A copy: rounding the shared model to bf16 and back would change the weights every later test compares with.
    copy.deepcopy(zoo.torch_model("mistral")).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, config = load_hf(tmp_path / "bf16", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert config.checkpoint_dtype == "bfloat16"
    assert model.layers.mlp.up_proj[...].dtype == jnp.float32
    hidden = model(jnp.asarray(tokens))
    assert hidden.dtype == jnp.bfloat16
    logits, lp = _run(model, tokens)
    assert lp.dtype == np.float32
    # bf16 compute against the f32 reference: close, not equal.
    np.testing.assert_allclose(logits, zoo.logits("mistral", tokens), atol=0.15)

    save_hf(model, config, tmp_path / "out")  # keeps the checkpoint's dtype
    header = json.loads((tmp_path / "out" / "config.json").read_text())
    assert header["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    source = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), source.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        load_hf(tmp_path)


def test_missing_and_unexpected_tensors_are_listed(zoo, tmp_path):
    source = zoo.folder("qwen2")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.layers.0.self_attn.k_proj.bias"]
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_hf(tmp_path)
    message = str(error.value)
    assert "missing tensors (2): model.layers.0.self_attn.k_proj.bias, model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors (1): model.layers.0.self_attn.o_proj.bias" in message


def test_pickled_checkpoints_are_refused(zoo, tmp_path):
    (tmp_path / "config.json").write_text((zoo.folder("llama2") / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        load_hf(tmp_path)


def test_random_model_exports_with_a_tokenizer_folder(tmp_path):
    """init_model -> save_hf (tokenizer given as a folder) -> transformers gives our logits."""
    import torch
    import transformers

    tokenizer_folder = tmp_path / "tokenizer"
    make_chat_tokenizer().save_pretrained(tokenizer_folder)
    config = tiny_config(model_type="qwen3", qk_norm=True, eos_token_id=(3,))
    model = init_model(config, seed=7)
    save_hf(model, config, tmp_path / "out", tokenizer=tokenizer_folder)

    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 10)).astype(np.int32)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        reference = reloaded(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()
    logits, _ = _run(model, tokens)
    np.testing.assert_array_less(np.abs(logits - reference).max(), 1e-4)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert generation["eos_token_id"] == [3, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
