"""KV-cache generation: parity with transformers' generate and with our own full forward, batching, sampling, CLI.

The truth for greedy decoding is transformers' ``generate(do_sample=False)`` on
the same weights, one prompt at a time without padding; the truth for a cached
step is the decoder's full-sequence forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_fixtures import HF_VARIANTS, VOCAB, HFZoo
from train_fixtures import sft_config

from jaxrlhf import cli
from jaxrlhf.data import load_tokenizer
from jaxrlhf.data.chat import template_text
from jaxrlhf.models import KVCache, load_hf
from jaxrlhf.commands.generate import GenerateConfig, run_generate, stop_token_ids
from jaxrlhf.commands.sft import run_sft
from jaxrlhf.models.generate import Sampling, generate, left_pad, sample_next
from jaxrlhf.train.optim import OptimConfig

_PROMPT_LENGTHS = (7, 3, 11)
_NEW = 12


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> HFZoo:
    return HFZoo(tmp_path_factory.mktemp("generate_zoo"))


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in _PROMPT_LENGTHS]


def _hf_greedy(zoo: HFZoo, variant: str, prompt: list[int], **kwargs) -> list[int]:
    import torch

    out = zoo.torch_model(variant).generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=_NEW, pad_token_id=0, **kwargs
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_greedy_matches_transformers_generate(zoo, variant):
    """A left-padded batch of three prompts, each row against HF generating that prompt alone (windows included)."""
    model, _ = load_hf(zoo.folder(variant), dtype=jnp.float32)
    prompts = _prompts()
    ours = generate(model, prompts, max_new_tokens=_NEW)
    for row, prompt in enumerate(prompts):
        assert ours.tokens[row].tolist() == _hf_greedy(zoo, variant, prompt, eos_token_id=None)
    assert ours.lengths.tolist() == [_NEW] * 3 and not ours.stopped.any()
    assert len(set(ours.tokens.ravel().tolist())) > 5  # not one repeated token: the comparison bites


def test_stops_where_transformers_stops(zoo):
    model, _ = load_hf(zoo.folder("mistral"), dtype=jnp.float32)
    prompts = _prompts()
    free = _hf_greedy(zoo, "mistral", prompts[0], eos_token_id=None)
    stop = free[4]
    assert stop not in free[:4]  # row 0 stops at its fifth token
    ours = generate(model, prompts, max_new_tokens=_NEW, stop_ids=(stop,), pad_id=7)
    for row, prompt in enumerate(prompts):
        reference = _hf_greedy(zoo, "mistral", prompt, eos_token_id=stop)
        length = int(ours.lengths[row])
        assert ours.tokens[row, :length].tolist() == reference
        assert (ours.tokens[row, length:] == 7).all()  # padding after the stop
        assert bool(ours.stopped[row]) == (stop in reference)
    assert ours.lengths[0] == 5 and ours.completion(0) == free[:4]


@functools.partial(jax.jit, static_argnums=0)
def _extend(graphdef, params, tokens, cache, positions, segment_ids):
    model = nnx.merge(graphdef, params)
    hidden, cache = model.extend(tokens, cache, positions=positions, segment_ids=segment_ids)
    return hidden @ model.lm_head_matrix(), cache


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, tokens, segment_ids):
    model = nnx.merge(graphdef, params)
    return model(tokens, segment_ids=segment_ids) @ model.lm_head_matrix()


@pytest.mark.parametrize("variant, scan_layers, remat", [("mistral", True, "none"), ("qwen2", False, "full")])
def test_cached_steps_equal_the_full_forward(zoo, variant, scan_layers, remat):
    """Prefill a left-padded batch, then feed one token at a time: logits equal the full forward's everywhere.

    Mistral slides a window of 5 on every layer, Qwen2 a window of 4 on its second layer (here the layers
    run unrolled and rematerialised, as a run's config may say).
    """
    model, config = load_hf(zoo.folder(variant), dtype=jnp.float32, scan_layers=scan_layers, remat=remat)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, config.vocab_size, n).tolist() for n in (9, 6)]
    # Prefill 4 slots: the longer row's first 4 tokens, the shorter row's first one after 3 of padding.
    prefill = left_pad([rows[0][:4], rows[1][:1]], 4, pad_id=0)
    cache = KVCache.empty(config, 2, 9)
    logits, cache = _extend(graphdef, params, prefill["tokens"], cache, prefill["positions"], prefill["segment_ids"])
    steps = [logits]
    for t in range(5):
        tokens = np.array([[rows[0][4 + t]], [rows[1][1 + t]]], np.int32)
        positions = np.array([[4 + t], [1 + t]], np.int32)
        logits, cache = _extend(graphdef, params, tokens, cache, positions, np.ones_like(tokens))
        steps.append(logits)
    cached = np.asarray(jnp.concatenate(steps, axis=1))
    assert np.isfinite(cached).all()  # padding queries too
    # The reference: both rows in one full forward, the shorter one right-padded in segment 0.
    full = _full_logits(
        graphdef, params, np.array([rows[0], rows[1] + [0] * 3]), np.array([[1] * 9, [1] * 6 + [0] * 3])
    )
    np.testing.assert_allclose(cached[0], full[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(cached[1, 3:], full[1, :6], atol=2e-5, rtol=1e-5)
    assert int(cache.length) == 9


def test_batch_equals_one_prompt_at_a_time(zoo):
    model, _ = load_hf(zoo.folder("mistral"), dtype=jnp.float32)  # sliding windows shorter than the prompts
    prompts = _prompts(seed=6)
    stop_ids = (3, 17)
    batched = generate(model, prompts, max_new_tokens=_NEW, stop_ids=stop_ids)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=_NEW, stop_ids=stop_ids)
        assert batched.completion(row) == alone.completion(0)
        assert batched.lengths[row] == alone.lengths[0] and batched.stopped[row] == alone.stopped[0]


def test_sampling_is_reproducible_by_seed(zoo):
    model, _ = load_hf(zoo.folder("llama3"), dtype=jnp.float32)
    prompts = _prompts(seed=8)
    sampling = Sampling(temperature=1.0, top_k=40, top_p=0.95)

    def run(seed, sampling=sampling):
        return generate(model, prompts, max_new_tokens=_NEW, sampling=sampling, seed=seed).tokens

    np.testing.assert_array_equal(run(0), run(0))
    assert (run(0) != run(1)).mean() > 0.5


def test_sample_next_follows_temperature_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 10000)

    def frequencies(sampling):
        draw = jax.jit(jax.vmap(lambda key: sample_next(logits, key, sampling)))
        return np.bincount(np.asarray(draw(keys)[:, 0]), minlength=5) / len(keys)

    def expected(probs):
        probs = np.asarray(probs, np.float64)
        return probs / probs.sum()

    tempered = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) ** 2  # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(frequencies(Sampling(temperature=0.5)), expected(tempered), atol=0.02)
    np.testing.assert_allclose(
        frequencies(Sampling(temperature=1.0, top_k=2)), expected([0.4, 0.3, 0, 0, 0]), atol=0.02
    )
    # top_p=0.8: 0.4 + 0.3 < 0.8, so the smallest set reaching it takes the third token too.
    np.testing.assert_allclose(
        frequencies(Sampling(temperature=1.0, top_p=0.8)), expected([0.4, 0.3, 0.15, 0, 0]), atol=0.02
    )
    random_logits = jax.random.normal(jax.random.key(1), (4, 64))
    greedy = jnp.argmax(random_logits, axis=-1)
    for sampling in (Sampling(), Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)):
        np.testing.assert_array_equal(sample_next(random_logits, keys[0], sampling), greedy)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_stop_tokens_include_the_templates_end_of_turn(base_model):
    tokenizer = load_tokenizer(base_model)
    _, model_config = load_hf(base_model, dtype=jnp.float32)
    chatml = stop_token_ids(tokenizer, template_text(tokenizer, None), model_config, base_model)
    assert set(tokenizer.convert_ids_to_tokens(chatml)) == {"<|endoftext|>", "<|im_end|>"}
    llama3 = stop_token_ids(tokenizer, template_text(tokenizer, "llama3"), model_config, base_model)
    assert "<|eot_id|>" in tokenizer.convert_ids_to_tokens(llama3)


def test_cli_generates_from_a_model_folder(base_model, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    prompts = ["count: rain ant cow", "hello"]
    args = ["generate", "--model", base_model, "--prompt", json.dumps(prompts), "--max_new_tokens", "6"]
    assert cli.main([*args, "--batch_size", "1", "--out", str(out)]) == 0  # two batches
    printed = capsys.readouterr().out
    assert "### 1: count: rain ant cow" in printed and "### 2: hello" in printed
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"] for r in results] == [[{"role": "user", "content": p}] for p in prompts]
    for result in results:
        assert result["finish_reason"] in ("stop", "length") and 1 <= result["num_tokens"] <= 6
    with pytest.raises(ValueError, match="quote it"):  # unquoted, YAML reads "count: ..." as a mapping
        run_generate(GenerateConfig(model=base_model, prompt={"count": "rain ant cow"}))


def test_run_checkpoint_generates_like_its_export(base_model, tmp_path):
    """Prompts from a JSONL file, greedy, from a 1-step SFT run's checkpoint and from its HF export: identical."""
    run_dir = tmp_path / "run"
    train = sft_config(run_dir, base_model, max_steps=1, export=True, optim=OptimConfig(learning_rate=3e-3))
    run_sft(dataclasses.replace(train, data=dataclasses.replace(train.data, eval_fraction=0.0)))
    prompts = tmp_path / "prompts.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "upper: owl gray"}, {"role": "assistant", "content": "OWL GRAY"}]},
        {"prompt": "sort: gray black rock snow"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "count: wind rain"}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = GenerateConfig(run_dir=str(run_dir), prompts_file=str(prompts), max_new_tokens=6, batch_size=1)
    from_run = run_generate(config)
    from_folder = run_generate(dataclasses.replace(config, run_dir="", model=str(run_dir / "hf")))
    assert from_run == from_folder
    assert from_run != run_generate(dataclasses.replace(config, run_dir="", model=base_model))  # it was trained
    assert [r["messages"] for r in from_run] == [
        records[0]["messages"][:1],
        [{"role": "user", "content": "sort: gray black rock snow"}],
        records[2]["prompt"],
    ]
