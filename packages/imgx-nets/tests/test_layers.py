"""Layers against closed forms: norms, sinusoidal embedding, up-sampling, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imgx_nets import layers, sinusoidal_embedding


def test_instance_norm_zero_mean_unit_variance_per_sample_and_channel():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
    y = layers.InstanceNorm(3)(x)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 2)), 1.0, rtol=1e-3)


def test_layer_norm_matches_formula():
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    norm = layers.LayerNorm(8)
    norm.scale[...] = jnp.arange(8.0)
    norm.bias[...] = jnp.ones(8)
    expected = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(norm(x), expected * jnp.arange(8.0) + 1, rtol=1e-4, atol=1e-5)


def test_sinusoidal_embedding_closed_form():
    e = sinusoidal_embedding(jnp.array([0.0, 0.5]), 8)
    np.testing.assert_array_equal(e[0], [0, 0, 0, 0, 1, 1, 1, 1])
    freqs = 10_000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(e[1, :4], np.sin(500.0 * freqs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e[1, 4:], np.cos(500.0 * freqs), rtol=1e-5, atol=1e-5)


def test_up_sample_is_a_kernel_equals_stride_transposed_convolution():
    up = layers.UpSample(3, 2, (2, 1, 3), rngs=nnx.Rngs(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(2), (1, 2, 3, 2, 3))
    h = up.dense(x)  # (1, 2, 3, 2, 2*1*3*2): output voxel (2i+a, j, 3k+c) = h[i, j, k, a, c]
    h = np.asarray(h).reshape(1, 2, 3, 2, 2, 1, 3, 2)
    expected = np.zeros((1, 4, 3, 6, 2), np.float32)
    for a in range(2):
        for c in range(3):
            expected[:, a::2, :, c::3] = h[:, :, :, :, a, 0, c]
    out = layers.InstanceNorm(2)(jnp.asarray(expected))
    np.testing.assert_allclose(up(x), out, rtol=1e-5, atol=1e-5)


def test_dropout_keeps_expectation():
    x = jnp.ones((10_000,))
    y = layers.dropout(x, 0.25, jax.random.key(0))
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 4.0 / 3.0], rtol=1e-6)
    assert abs(float(y.mean()) - 1.0) < 0.03
    assert layers.dropout(x, 0.25, None) is x


def test_threefry2x32_known_answers():
    # Random123's known-answer tests for Threefry-2x32, 20 rounds (kat_vectors).
    cases = [
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for key, counter, expected in cases:
        out = layers.threefry2x32(
            tuple(jnp.uint32(k) for k in key), tuple(jnp.uint32(c) for c in counter)
        )
        assert tuple(int(v) for v in out) == expected


def test_dropout_mask_rate_and_independence():
    x = jnp.ones((64, 32, 16))
    keys = jax.random.split(jax.random.key(3), 2)
    kept = [np.asarray(layers.dropout(x, 0.1, k) != 0) for k in keys]
    n = x.size
    for k in kept:  # Binomial(n, 0.9): within 5 standard deviations
        assert abs(k.sum() - 0.9 * n) < 5 * np.sqrt(n * 0.9 * 0.1)
    assert (kept[0] != kept[1]).mean() > 0.1  # different keys, different masks
    # neighbouring entries are not correlated (a broken counter would repeat masks)
    assert abs(np.corrcoef(kept[0][..., :-1].ravel(), kept[0][..., 1:].ravel())[0, 1]) < 0.05


def test_dropout_mask_does_not_depend_on_sharding():
    mesh = jax.make_mesh((2,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    key = jax.random.key(7)
    f = jax.jit(lambda v, k: layers.dropout(v, 0.3, k))
    np.testing.assert_array_equal(f(jax.device_put(x, sharding), key), f(x, key))


def _lax_conv3d(x, kernel, strides, padding):
    dn = ("NDHWC", "DHWIO", "NDHWC")
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn)


@pytest.mark.parametrize("kernel_size", [(3, 3, 3), (2, 3, 2), (3, 3, 1)])
def test_conv3d_as_2d_equals_3d_convolution(kernel_size):
    conv = layers.Conv(3, 5, kernel_size, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.arange(5.0)
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 4, 3))
    expected = _lax_conv3d(x, conv.kernel[...], (1, 1, 1), "SAME") + jnp.arange(5.0)
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        layers._conv3d_as_2d(x, conv.kernel[...]) + jnp.arange(5.0), expected, rtol=1e-5, atol=1e-5
    )


def test_down_sample_equals_strided_convolution():
    down = layers.DownSample(3, 4, (2, 2, 1), dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3, 3))
    expected = down.norm(_lax_conv3d(x, down.conv.kernel[...], (2, 2, 1), "VALID"))
    np.testing.assert_allclose(down(x), expected, rtol=1e-5, atol=1e-5)


def test_convolution_supports_forward_and_reverse_mode():
    # a convolution is linear in its input: its jvp is the convolution of the tangent
    conv = layers.Conv(3, 4, (3, 3, 2), use_bias=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x, dx = jax.random.normal(jax.random.key(0), (2, 2, 5, 4, 3, 3))
    out, tangent = jax.jvp(conv, (x,), (dx,))
    np.testing.assert_allclose(tangent, conv(dx), rtol=1e-5, atol=1e-5)
    (cotangent,) = jax.vjp(conv, x)[1](out)
    assert float(jnp.vdot(cotangent, dx)) == pytest.approx(float(jnp.vdot(out, tangent)), rel=1e-4)
