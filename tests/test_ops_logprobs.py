"""Target-aligned log-probs: values against float64 numpy, chunked == unchunked, masks, memory."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.ops import logprobs, losses


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_logprobs(logits, tokens, segment_ids=None):
    """Reference: out[b, t] = log_softmax(logits[b, t-1])[tokens[b, t]] if t has context in its segment."""
    logits = np.asarray(logits, np.float64)
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    lsm = np_log_softmax(logits)
    out = np.zeros((batch, length))
    for b in range(batch):
        for t in range(1, length):
            if segment_ids is not None:
                seg = segment_ids[b]
                if seg[t] == 0 or seg[t] != seg[t - 1]:
                    continue
            out[b, t] = lsm[b, t - 1, tokens[b, t]]
    return out


def random_problem(seed, batch=2, length=10, dim=8, vocab=37, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(k1, (batch, length, dim), dtype)
    lm_head = (jax.random.normal(k2, (dim, vocab), dtype) / np.sqrt(dim)).astype(dtype)
    tokens = jax.random.randint(k3, (batch, length), 0, vocab, dtype=jnp.int32)
    return hidden, lm_head, tokens


SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]], np.int32)


class TokenLogprobsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_float64_reference(self):
        hidden, lm_head, tokens = random_problem(0)
        logits = hidden @ lm_head
        out = self.variant(logprobs.token_logprobs)(logits, tokens)
        chex.assert_shape(out, tokens.shape)
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(out, np_token_logprobs(logits, tokens), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_packed_rows_zero_at_segment_starts_and_padding(self):
        hidden, lm_head, tokens = random_problem(1)
        logits = hidden @ lm_head
        seg = jnp.asarray(SEGMENTS)
        out = np.asarray(self.variant(lambda l, t, s: logprobs.token_logprobs(l, t, segment_ids=s))(logits, tokens, seg))
        np.testing.assert_allclose(out, np_token_logprobs(logits, tokens, SEGMENTS), atol=1e-5)
        starts = np.array([[0, 3, 7, 9], [0, 6, 7, 8]])
        for b in range(2):
            assert np.all(out[b, starts[b]] == 0.0)
        assert np.all(out[1, 6:] == 0.0)
        assert np.all(out[0, [1, 2, 4, 5, 6, 8]] < 0.0)

    def test_bf16_logits_are_normalised_in_float32(self):
        hidden, lm_head, tokens = random_problem(2, vocab=1000)
        logits = (hidden @ lm_head * 20.0).astype(jnp.bfloat16)
        out = logprobs.token_logprobs(logits, tokens)
        chex.assert_type(out, jnp.float32)
        reference = np_token_logprobs(np.asarray(logits.astype(jnp.float32)), tokens)
        np.testing.assert_allclose(out, reference, atol=1e-4)

    def test_stable_for_logits_of_magnitude_1e4(self):
        _, _, tokens = random_problem(3, vocab=37)
        logits = jax.random.uniform(jax.random.PRNGKey(4), (2, 10, 37), minval=-1e4, maxval=1e4)
        out = logprobs.token_logprobs(logits, tokens)
        grads = jax.grad(lambda l: logprobs.token_logprobs(l, tokens).sum())(logits)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(grads))
        np.testing.assert_allclose(out, np_token_logprobs(logits, tokens), rtol=1e-6, atol=1e-2)

    def test_shape_errors_are_clear(self):
        with self.assertRaisesRegex(ValueError, "disagree"):
            logprobs.token_logprobs(jnp.zeros((2, 5, 7)), jnp.zeros((2, 6), jnp.int32))
        with self.assertRaisesRegex(ValueError, "segment_ids"):
            logprobs.token_logprobs(jnp.zeros((2, 5, 7)), jnp.zeros((2, 5), jnp.int32), segment_ids=jnp.zeros((2, 4)))
        with self.assertRaisesRegex(ValueError, "lm_head"):
            logprobs.chunked_token_logprobs(jnp.zeros((2, 5, 3)), jnp.zeros((4, 7)), jnp.zeros((2, 5), jnp.int32), chunk_size=2)


def _weighted_sum(fn):
    # A non-uniform cotangent so that gradient bugs at particular positions show up.
    weights = jnp.linspace(0.5, 1.5, 10)

    def loss(hidden, lm_head, tokens, segment_ids):
        return jnp.sum(fn(hidden, lm_head, tokens, segment_ids) * weights)

    return loss


def _unchunked(hidden, lm_head, tokens, segment_ids):
    logits = jnp.einsum("btd,dv->btv", hidden, lm_head, preferred_element_type=jnp.float32)
    return logprobs.token_logprobs(logits, tokens, segment_ids=segment_ids)


class ChunkedTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_values_and_grads_equal_unchunked(self):
        hidden, lm_head, tokens = random_problem(5)
        for segment_ids in (None, jnp.asarray(SEGMENTS)):
            expected = _unchunked(hidden, lm_head, tokens, segment_ids)
            expected_grads = jax.grad(_weighted_sum(_unchunked), argnums=(0, 1))(hidden, lm_head, tokens, segment_ids)
            for chunk_size in (1, 3, 4, 10, 64):  # 3 and 4 do not divide T = 10

                def chunked(h, w, t, s, chunk_size=chunk_size):
                    return logprobs.chunked_token_logprobs(h, w, t, chunk_size=chunk_size, segment_ids=s)

                out = self.variant(chunked)(hidden, lm_head, tokens, segment_ids)
                chex.assert_trees_all_close(out, expected, atol=1e-5)
                grads = self.variant(jax.grad(_weighted_sum(chunked), argnums=(0, 1)))(
                    hidden, lm_head, tokens, segment_ids
                )
                chex.assert_trees_all_close(grads, expected_grads, atol=1e-5)

    def test_bf16_inputs_accumulate_in_float32(self):
        hidden, lm_head, tokens = random_problem(6, vocab=300, dim=32, dtype=jnp.bfloat16)
        out = logprobs.chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=4)
        chex.assert_type(out, jnp.float32)
        reference = np_token_logprobs(
            np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64), np.asarray(tokens)
        )
        np.testing.assert_allclose(out, reference, atol=2e-3)
        grads = jax.grad(lambda h, w: logprobs.chunked_token_logprobs(h, w, tokens, chunk_size=4).sum(), (0, 1))(
            hidden, lm_head
        )
        chex.assert_type(grads, jnp.bfloat16)
        ref_grads = jax.grad(lambda h, w: _unchunked(h, w, tokens, None).sum(), (0, 1))(
            hidden.astype(jnp.float32), lm_head.astype(jnp.float32)
        )
        for got, want in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)

    def test_sharded_inputs_under_jit(self):
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        hidden, lm_head, tokens = random_problem(7, batch=4, length=12, dim=8, vocab=64)
        hidden_s = jax.device_put(hidden, NamedSharding(mesh, P(("data", "fsdp"), None, None)))
        lm_head_s = jax.device_put(lm_head, NamedSharding(mesh, P(None, "tensor")))
        tokens_s = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"), None)))

        @jax.jit
        def value_and_grads(h, w, t):
            def loss(h, w):
                return losses.sft_loss(logprobs.chunked_token_logprobs(h, w, t, chunk_size=5), jnp.ones_like(t))[0]

            return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

        got = value_and_grads(hidden_s, lm_head_s, tokens_s)
        want = jax.value_and_grad(
            lambda h, w: losses.sft_loss(_unchunked(h, w, tokens, None), jnp.ones_like(tokens))[0], argnums=(0, 1)
        )(hidden, lm_head)
        chex.assert_trees_all_close(got, want, atol=1e-5)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_peak_memory_is_at_least_8x_below_unchunked():
    batch, length, dim, vocab, chunk = 2, 2048, 256, 32768, 128
    hidden = jax.ShapeDtypeStruct((batch, length, dim), jnp.float32)
    lm_head = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def full(h, w, t):
        return jax.value_and_grad(lambda h, w: _unchunked(h, w, t, None).sum(), argnums=(0, 1))(h, w)

    def chunked(h, w, t):
        return jax.value_and_grad(
            lambda h, w: logprobs.chunked_token_logprobs(h, w, t, chunk_size=chunk).sum(), argnums=(0, 1)
        )(h, w)

    full_bytes = _temp_bytes(full, hidden, lm_head, tokens)
    chunked_bytes = _temp_bytes(chunked, hidden, lm_head, tokens)
    assert full_bytes >= batch * length * vocab * 4  # at least one [B, T, V] f32 buffer
    assert full_bytes >= 8 * chunked_bytes, (full_bytes, chunked_bytes)


class SequenceLogprobsTest(chex.TestCase):
    def test_sequence_and_segment_sums(self):
        rng = np.random.default_rng(0)
        token_lp = rng.normal(size=(2, 10)).astype(np.float32)
        mask = rng.integers(0, 2, size=(2, 10)).astype(np.int32)
        np.testing.assert_allclose(
            logprobs.sequence_logprobs(jnp.asarray(token_lp), jnp.asarray(mask)),
            (token_lp.astype(np.float64) * mask).sum(-1),
            rtol=1e-6,
        )
        per_segment = logprobs.segment_logprobs(
            jnp.asarray(token_lp), jnp.asarray(mask), jnp.asarray(SEGMENTS), num_segments=4
        )
        chex.assert_shape(per_segment, (2, 4))
        for b in range(2):
            for s in range(1, 5):
                want = sum(token_lp[b, t] * mask[b, t] for t in range(10) if SEGMENTS[b, t] == s)
                np.testing.assert_allclose(per_segment[b, s - 1], want, rtol=1e-6, atol=1e-6)

    def test_sequence_logprobs_on_pairs(self):
        token_lp = jnp.ones((3, 2, 5))
        mask = jnp.asarray(np.tile([0, 1, 1, 0, 0], (3, 2, 1)))
        chex.assert_trees_all_close(logprobs.sequence_logprobs(token_lp, mask), jnp.full((3, 2), 2.0))


BUCKETS = (16, 32, 64)


@jax.jit
def _per_target_gradient(logits, tokens, loss_mask):
    """d(sft loss)/d(logit of the observed next token): non-zero exactly where a target is trained."""
    grads = jax.grad(lambda l: losses.sft_loss(logprobs.token_logprobs(l, tokens), loss_mask)[0])(logits)
    return grads, losses.sft_loss(logprobs.token_logprobs(logits, tokens), loss_mask)[1]["trained_tokens"]


@given(
    prompt_len=st.integers(1, 30),
    response_len=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_response_of_n_tokens_gives_n_trained_targets(prompt_len, response_len, seed):
    length = next(b for b in BUCKETS if b >= prompt_len + response_len)
    rng = np.random.default_rng(seed)
    vocab = 11
    eos = vocab - 1
    tokens = rng.integers(0, vocab - 1, size=(1, length)).astype(np.int32)
    tokens[0, prompt_len + response_len - 1] = eos
    tokens[0, prompt_len + response_len :] = 0  # padding
    loss_mask = np.zeros((1, length), np.int32)
    loss_mask[0, prompt_len : prompt_len + response_len] = 1  # response span incl. EOS, by token index
    logits = rng.normal(size=(1, length, vocab)).astype(np.float32)
    grads, trained = _per_target_gradient(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))
    assert int(trained) == response_len
    grads = np.asarray(grads)
    # Token t is trained iff the logits at t-1 receive gradient on the logit of tokens[t].
    trained_targets = [t for t in range(1, length) if grads[0, t - 1, tokens[0, t]] != 0.0]
    assert trained_targets == list(range(prompt_len, prompt_len + response_len))
    assert prompt_len in trained_targets  # first response token
    assert prompt_len + response_len - 1 in trained_targets  # EOS


class KnownBugRegressionTest(chex.TestCase):
    """The two shipped bugs, reproduced with their index arithmetic in numpy, next to ours."""

    def _logits(self, length, vocab):
        return np.random.default_rng(3).normal(size=(1, length, vocab)).astype(np.float32)

    def test_openrlhf_first_response_token(self):
        # "Hello" | ", World !" <eot>: prompt of 1 token, response of 3 tokens + EOS.
        tokens = np.array([[0, 1, 2, 3, 4]], np.int32)
        logits = self._logits(5, 5)
        lsm = np_log_softmax(logits)
        target_lp = np.array([lsm[0, t - 1, tokens[0, t]] for t in range(1, 5)])  # for ",", World, !, <eot>
        # OpenRLHF: loss_mask[prompt_len:-1] = 1 on the inputs, then loss_mask[:, :-1] against next-token log-probs.
        their_mask = np.zeros(5)
        their_mask[1:-1] = 1
        their_sum = (target_lp * their_mask[:-1]).sum()
        assert their_mask[:-1].sum() == 3 and their_mask[:-1][0] == 0  # ',' dropped
        ours = np.array([[0, 1, 1, 1, 1]], np.int32)
        token_lp = logprobs.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
        our_sum = float(logprobs.sequence_logprobs(token_lp, jnp.asarray(ours))[0])
        np.testing.assert_allclose(our_sum, target_lp.sum(), rtol=1e-5)
        assert not np.isclose(our_sum, their_sum)
        assert float(losses.sft_loss(token_lp, jnp.asarray(ours))[1]["trained_tokens"]) == 4

    def test_minimind_first_answer_token_and_token_after_end_of_turn(self):
        # ... "<|im_start|>assistant\n" | "Hello" " there" "<|im_end|>" | "\n" <pad>
        tokens = np.array([[0, 1, 2, 3, 4, 5, 6, 7]], np.int32)
        start, end = 3, 5  # first answer token, its <|im_end|>
        logits = self._logits(8, 8)
        lsm = np_log_softmax(logits)
        lp = np.array([0.0] + [lsm[0, t - 1, tokens[0, t]] for t in range(1, 8)])
        their_mask = np.zeros(8)
        their_mask[start + 1 : end + 2] = 1  # range(start + 1, end + len(eos) + 1)
        assert their_mask[start] == 0 and their_mask[end + 1] == 1
        ours = np.zeros((1, 8), np.int32)
        ours[0, start : end + 1] = 1
        token_lp = logprobs.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
        np.testing.assert_allclose(token_lp[0], lp, atol=1e-5)
        our_sum = float(logprobs.sequence_logprobs(token_lp, jnp.asarray(ours))[0])
        np.testing.assert_allclose(our_sum, lp[start : end + 1].sum(), rtol=1e-5)
        assert not np.isclose(our_sum, (lp * their_mask).sum())
