"""QLoRA's blockwise weight quantization against a float64 numpy reference."""

import numpy as np
import pytest
import jax.numpy as jnp

from jaxrlhf.ops import quantize as quant

# NormalFloat4 as QLoRA defines it: 8 positive and 7 negative normal quantiles, scaled to [-1, 1], and 0.
# Rebuilt here from the definition (scipy's normal quantile via the inverse error function in numpy terms).


def _reference_nf4_levels() -> np.ndarray:
    from statistics import NormalDist

    offset = 0.9677083
    quantile = NormalDist().inv_cdf
    positive = [quantile(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-quantile(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative))
    return levels / np.abs(levels).max()


def _reference(w: np.ndarray, qtype: str, block: int) -> np.ndarray:
    """Dequantized ``w`` in float64: absmax per block of the last axis, nearest level."""
    blocks = w.astype(np.float64).reshape(*w.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    normed = blocks / np.where(absmax == 0, 1, absmax)
    if qtype == "int8":
        values = np.round(normed * 127) / 127
    else:
        levels = _reference_nf4_levels()
        values = levels[np.abs(normed[..., None] - levels).argmin(-1)]
    return (values * absmax).reshape(w.shape)


def test_nf4_levels_are_qloras_normal_quantiles():
    np.testing.assert_allclose(quant.NF4_LEVELS, _reference_nf4_levels(), atol=1e-6)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("shape", [(3, 128), (2, 4, 96), (5, 16)])
def test_dequantized_equals_the_float64_reference(qtype, shape):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.01, 3.0, size=shape[:-1] + (1,)).astype(np.float32)
    w[..., 0] = 0.0  # exact zeros stay exact
    codes, scales = quant.quantize(jnp.asarray(w), qtype)
    assert codes.shape == quant.quantized_shapes(shape, qtype)[0] and scales.shape == quant.quantized_shapes(shape, qtype)[1]
    assert codes.dtype == (jnp.int8 if qtype == "int8" else jnp.uint8)
    got = np.asarray(quant.dequantize(codes, scales, qtype, jnp.float32))
    want = _reference(w, qtype, quant.block_size(shape[-1]))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.all(got[..., 0] == 0)
    # The error bound of the scheme itself: half the widest gap between levels, times the block's absmax.
    gaps = np.diff(quant.NF4_LEVELS).max() / 2 if qtype == "nf4" else 0.5 / 127
    absmax = np.abs(w.reshape(*shape[:-1], -1, quant.block_size(shape[-1]))).max(-1)
    bound = np.repeat(absmax, quant.block_size(shape[-1]), axis=-1) * gaps
    assert np.all(np.abs(got - w) <= bound + 1e-6)


def test_block_sizes_and_shapes():
    assert quant.block_size(4096) == 64 and quant.block_size(96) == 32 and quant.block_size(16) == 16
    assert quant.quantized_shapes((4, 4096), "nf4") == ((4, 2048), (4, 64))
    assert quant.quantized_shapes((4, 4096), "int8") == ((4, 4096), (4, 64))
    with pytest.raises(ValueError, match="odd size 7"):
        quant.quantized_shapes((2, 7), "nf4")
    with pytest.raises(ValueError, match="unknown weight_qtype 'fp4'"):
        quant.quantized_shapes((2, 8), "fp4")
