"""Building blocks of the U-Net: norms, residual blocks, re-sampling, transformer, time embedding.

Every layer keeps float32 parameters and computes in its `dtype` (bfloat16 for mixed
precision); norm statistics, the softmax and the time embedding's sinusoids are float32.
Arrays are channels-last: `(batch, *spatial, channels)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from imgx_nets.attention import dot_product_attention

# Diffusion time t lies in (0, 1]; scaling by 1000 gives the sinusoids the frequency range of
# integer DDPM steps they were designed for (Ho et al. 2020, Vaswani et al. 2017).
TIME_SCALE = 1000.0
_MAX_PERIOD = 10_000.0


def as_tuple(value: int | Sequence[int], num_spatial_dims: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of ints as a tuple with one positive entry per spatial axis."""
    values = (value,) * num_spatial_dims if isinstance(value, int) else tuple(value)
    if len(values) != num_spatial_dims or any(int(v) != v or v < 1 for v in values):
        raise ValueError(
            f"imgx_nets: {name} must be a positive int or {num_spatial_dims} positive ints "
            f"(one per spatial axis), got {value!r}."
        )
    return tuple(int(v) for v in values)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(
    key: tuple[chex.Array, chex.Array], counter: tuple[chex.Array, chex.Array]
) -> tuple[chex.Array, chex.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011, "Parallel random numbers: as easy as
    1, 2, 3"): a keyed bijection of the uint32 pair `counter`, elementwise.

    The same function as `jax.random`'s Threefry, written out without a loop so XLA fuses it
    into its consumer: on CPU, `jax.random.bits` runs the rounds as a rolled loop over
    full-size state arrays, which falls out of cache beyond ~2M words (40x slower per word
    at 4M, bench/README.md).
    """
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = counter[0] + ks[0], counter[1] + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def random_bits(key: chex.PRNGKey, shape: tuple[int, ...]) -> chex.Array:
    """Uniform uint32 bits of `shape`: Threefry-2x32 of each entry's row-major index.

    Elementwise in the index, so the result does not depend on how the array is sharded
    and XLA computes each device's part in one fused loop.
    """
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"imgx_nets: random_bits supports < 2**32 entries, got {shape}.")
    k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return threefry2x32((k0, k1), (index, jnp.zeros_like(index)))[0]


def dropout(x: chex.Array, rate: float, key: chex.PRNGKey | None) -> chex.Array:
    """Inverted dropout: zero each entry with probability `rate`, scale the rest by 1/(1-rate).

    Entry i is kept when `random_bits(key)[i] >= round(rate * 2**32)` (the rate exact to
    2^-32), computed in the same fusion as the select. Identity when `key` is None
    (evaluation) or `rate` is 0.
    """
    if key is None or rate == 0.0:
        return x
    keep = random_bits(key, x.shape) >= jnp.uint32(round(rate * 2**32))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def fold_key(key: chex.PRNGKey | None, index: int) -> chex.PRNGKey | None:
    """An independent key for sub-layer `index`, or None when dropout is off."""
    return None if key is None else jax.random.fold_in(key, index)


def normalize(
    x: chex.Array,
    axes: tuple[int, ...],
    scale: chex.Array,
    bias: chex.Array,
    eps: float,
    dtype: jnp.dtype,
) -> chex.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias, statistics over `axes` in float32.

    One pass over x: var = E[x^2] - E[x]^2 (clipped at 0), then a single fused multiply-add
    x * a + b with a = scale / sqrt(var + eps), b = bias - mean * a, applied in `dtype`.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    mean_sq = jnp.mean(jnp.square(x32), axis=axes, keepdims=True)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    a = scale * jax.lax.rsqrt(var + eps)
    b = bias - mean * a
    return x.astype(dtype) * a.astype(dtype) + b.astype(dtype)


class InstanceNorm(nnx.Module):
    """Instance norm: per sample and channel over the spatial axes, learned scale and bias.

    Ulyanov et al. 2016, arXiv 1607.08022. Input/output `(batch, *spatial, channels)`.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: chex.Array) -> chex.Array:
        axes = tuple(range(1, x.ndim - 1))
        return normalize(x, axes, self.scale[...], self.bias[...], self.eps, self.dtype)


class LayerNorm(nnx.Module):
    """Layer norm over the channel axis (Ba et al. 2016, arXiv 1607.06450)."""

    def __init__(self, num_features: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: chex.Array) -> chex.Array:
        return normalize(x, (x.ndim - 1,), self.scale[...], self.bias[...], self.eps, self.dtype)


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """'SAME' padding of a stride-1 convolution, as XLA pads it: the extra one at the end."""
    low = (kernel_size - 1) // 2
    return low, kernel_size - 1 - low


def _conv2d(x: chex.Array, kernel: chex.Array) -> chex.Array:
    """'SAME' stride-1 convolution, `(batch, x, y, in)` * `(kx, ky, in, out)`: XLA's own,
    with XLA's gradients on every backend (bench/README.md: a hand-written CPU kernel
    gradient no longer paid once dropout stopped dominating)."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv3d_as_2d(x: chex.Array, kernel: chex.Array) -> chex.Array:
    """'SAME' stride-1 3D convolution as one 2D convolution, z folded into the batch.

    y[.., z, :] = sum_dz conv2d(x[.., z + dz - pz, :], kernel[:, :, dz]) with x zero-padded in
    z: the kz shifted copies of x are stacked along channels and convolved with the kernel
    reshaped to `(kx, ky, kz * in, out)`. XLA:CPU runs 2D convolutions on its fast path but
    not 3D ones: the 3D train step is 1.9x faster this way (bench/README.md).
    """
    b, sx, sy, sz, c = x.shape
    kz = kernel.shape[2]
    x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), _same_padding(kz), (0, 0)])
    x = jnp.moveaxis(x, 3, 1)  # (b, z, x, y, c): slices along z are contiguous
    taps = jnp.concatenate([x[:, dz : dz + sz] for dz in range(kz)], axis=-1)
    kernel = kernel.reshape(*kernel.shape[:2], kz * c, kernel.shape[-1])  # (kx, ky, kz * c, o)
    out = _conv2d(taps.reshape(b * sz, sx, sy, kz * c), kernel)
    return jnp.moveaxis(out.reshape(b, sz, sx, sy, -1), 1, 3)


def _conv3d(x: chex.Array, kernel: chex.Array) -> chex.Array:
    """'SAME' stride-1 3D convolution: `_conv3d_as_2d` on CPU, XLA's 3D convolution elsewhere."""
    if jax.default_backend() == "cpu":
        return _conv3d_as_2d(x, kernel)
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


class Conv(nnx.Module):
    """'SAME' stride-1 convolution, channels-last, kernel `(*kernel_size, in, out)`.

    2D or 3D by the input rank; on CPU, 3D runs as a 2D convolution over z (`_conv3d_as_2d`). LeCun
    normal initialisation (fan-in = prod(kernel_size) * in), like `flax.nnx.Conv`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, ...],
        *,
        use_bias: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        shape = (*kernel_size, in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: chex.Array) -> chex.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        y = _conv3d(x, kernel) if x.ndim == 5 else _conv2d(x, kernel)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def _conv(in_features, out_features, kernel_size, *, use_bias, dtype, rngs) -> Conv:
    return Conv(in_features, out_features, kernel_size, use_bias=use_bias, dtype=dtype, rngs=rngs)


class ConvNormGelu(nnx.Module):
    """Convolution (no bias: the norm removes it) -> instance norm -> GELU."""

    def __init__(self, in_features, out_features, kernel_size, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(
            in_features, out_features, kernel_size, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.norm = InstanceNorm(out_features, dtype=dtype)

    def __call__(self, x: chex.Array) -> chex.Array:
        return jax.nn.gelu(self.norm(self.conv(x)))


class ResBlock(nnx.Module):
    """Residual block: conv-norm-GELU-dropout-conv-norm, time modulation, GELU of the sum.

    h = norm2(conv2(dropout(gelu(norm1(conv1(x))))));  h = h * (1 + s(t)) + b(t);
    out = gelu(h + shortcut(x)), shortcut = identity or a 1x1 convolution when the channel
    count changes. Time enters as a scale and shift after the second norm (FiLM, Perez et al.
    2018): a per-channel shift added before an instance norm would be removed by it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, ...],
        *,
        dropout_rate: float,
        time_features: int,
        dtype,
        rngs: nnx.Rngs,
    ):
        ones = (1,) * len(kernel_size)
        self.conv1 = _conv(
            in_features, out_features, kernel_size, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.norm1 = InstanceNorm(out_features, dtype=dtype)
        self.conv2 = _conv(
            out_features, out_features, kernel_size, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.norm2 = InstanceNorm(out_features, dtype=dtype)
        self.time_proj = (
            nnx.Linear(time_features, 2 * out_features, dtype=dtype, rngs=rngs)
            if time_features
            else None
        )
        self.shortcut = (
            _conv(in_features, out_features, ones, use_bias=True, dtype=dtype, rngs=rngs)
            if in_features != out_features
            else None
        )
        self.dropout_rate = dropout_rate

    def __call__(
        self, x: chex.Array, time_embedding: chex.Array | None, key: chex.PRNGKey | None
    ) -> chex.Array:
        h = jax.nn.gelu(self.norm1(self.conv1(x)))
        h = dropout(h, self.dropout_rate, key)
        h = self.norm2(self.conv2(h))
        if self.time_proj is not None:
            scale, shift = jnp.split(self.time_proj(time_embedding), 2, axis=-1)
            expand = (slice(None),) + (None,) * (h.ndim - 2)
            h = h * (1 + scale[expand]) + shift[expand]
        residual = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.gelu(h + residual)


def _pad_to_multiple(x: chex.Array, factors: tuple[int, ...]) -> chex.Array:
    pad = [(0, 0)] + [(0, -n % f) for n, f in zip(x.shape[1:-1], factors, strict=True)] + [(0, 0)]
    return jnp.pad(x, pad) if any(p for _, p in pad) else x


class DownSample(nnx.Module):
    """Strided convolution (kernel = stride = `factors`) -> instance norm.

    With kernel = stride every output voxel sees its own block of prod(factors) input voxels:
    a space-to-depth rearrangement and one matrix product with the `(*factors, in, out)`
    kernel. Spatial sizes that are not multiples of the factors are zero-padded at the end
    first, so the output size is ceil(n / factor) and the decoder crops back to n.
    """

    def __init__(self, in_features, out_features, factors: tuple[int, ...], *, dtype, rngs):
        self.factors = factors
        self.conv = Conv(in_features, out_features, factors, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = InstanceNorm(out_features, dtype=dtype)

    def __call__(self, x: chex.Array) -> chex.Array:
        x = _pad_to_multiple(x, self.factors).astype(self.conv.dtype)
        b, *spatial, c = x.shape
        n = len(spatial)
        blocks = [d for s, f in zip(spatial, self.factors, strict=True) for d in (s // f, f)]
        x = x.reshape(b, *blocks, c)
        # (b, s1, f1, .., sn, fn, c) -> (b, s1, .., sn, f1, .., fn, c)
        x = jnp.transpose(x, [0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1])
        x = x.reshape(b, *blocks[::2], -1)
        kernel = self.conv.kernel[...].astype(self.conv.dtype)
        return self.norm(x @ kernel.reshape(-1, kernel.shape[-1]))


class UpSample(nnx.Module):
    """Transposed convolution (kernel = stride = `factors`) -> instance norm.

    With kernel = stride the transposed convolution maps every input voxel to its own
    prod(factors) output voxels, i.e. a dense layer to prod(factors) * out channels followed
    by a depth-to-space rearrangement: one matrix product, no zero-dilated input.
    """

    def __init__(self, in_features, out_features, factors: tuple[int, ...], *, dtype, rngs):
        self.factors = factors
        self.out_features = out_features
        self.dense = nnx.Linear(
            in_features, math.prod(factors) * out_features, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.norm = InstanceNorm(out_features, dtype=dtype)

    def __call__(self, x: chex.Array) -> chex.Array:
        b, *spatial, _ = x.shape
        n = len(spatial)
        h = self.dense(x).reshape(b, *spatial, *self.factors, self.out_features)
        # (b, s1, .., sn, f1, .., fn, c) -> (b, s1, f1, .., sn, fn, c)
        order = [0] + [i for d in range(n) for i in (1 + d, 1 + n + d)] + [1 + 2 * n]
        h = jnp.transpose(h, order)
        h = h.reshape(b, *(s * f for s, f in zip(spatial, self.factors, strict=True)), -1)
        return self.norm(h)


class TransformerLayer(nnx.Module):
    """Pre-LN transformer encoder layer (Xiong et al. 2020): x + MHA(LN x), then x + MLP(LN x).

    Tokens `(batch, length, features)`; no positional embedding. Multi-head attention with
    `num_heads` heads of `head_dim`; MLP hidden size `widening_factor * features`, GELU.
    """

    def __init__(
        self,
        features: int,
        *,
        num_heads: int,
        head_dim: int,
        widening_factor: int,
        dropout_rate: float,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout_rate = dropout_rate
        width = num_heads * head_dim

        def linear(i, o):
            return nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

        self.attention_norm = LayerNorm(features, dtype=dtype)
        self.qkv = linear(features, 3 * width)
        self.attention_out = linear(width, features)
        self.mlp_norm = LayerNorm(features, dtype=dtype)
        self.mlp_in = linear(features, widening_factor * features)
        self.mlp_out = linear(widening_factor * features, features)

    def __call__(self, x: chex.Array, key: chex.PRNGKey | None) -> chex.Array:
        b, length, _ = x.shape
        qkv = self.qkv(self.attention_norm(x)).reshape(b, length, 3, self.num_heads, -1)
        h = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        h = self.attention_out(h.reshape(b, length, -1))
        x = x + dropout(h, self.dropout_rate, fold_key(key, 0))
        h = self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))
        return x + dropout(h, self.dropout_rate, fold_key(key, 1))


def sinusoidal_embedding(t: chex.Array, dim: int) -> chex.Array:
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017, Sec. 3.5).

    e(t) = [sin(1000 t w_0), .., sin(1000 t w_{d/2-1}), cos(1000 t w_0), ..], with
    w_i = 10000^(-i / (d/2)). `t (batch,)` -> `(batch, dim)` float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = TIME_SCALE * t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TimeEmbedding(nnx.Module):
    """t `(batch,)` -> gelu(MLP(sinusoidal(t))) `(batch, features)`, shared by all blocks."""

    def __init__(self, features: int, *, dtype, rngs: nnx.Rngs):
        if features % 2:
            raise ValueError(
                "imgx_nets: the time embedding size (bottom channels) must be even, "
                f"got {features}."
            )
        self.features = features
        self.dense1 = nnx.Linear(features, features, dtype=dtype, rngs=rngs)
        self.dense2 = nnx.Linear(features, features, dtype=dtype, rngs=rngs)

    def __call__(self, t: chex.Array) -> chex.Array:
        h = jax.nn.gelu(self.dense1(sinusoidal_embedding(t, self.features)))
        return jax.nn.gelu(self.dense2(h))
