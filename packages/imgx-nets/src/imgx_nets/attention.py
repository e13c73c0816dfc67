"""Scaled dot-product attention: plain, memory-efficient (chunked) and backend dispatch.

`dot_product_attention` runs cuDNN flash attention on GPU for bfloat16/float16 inputs of a
shape cuDNN supports and `efficient_dot_product_attention` in every other case (float32,
CPU, TPU); `dot_product_attention_reference` is the quadratic one, for tests.

All functions take `query (batch, q_length, heads, head_dim)`, `key (batch, kv_length, heads,
head_dim)`, `value (batch, kv_length, heads, value_dim)` and return `(batch, q_length, heads,
value_dim)` in the dtype of `query`:

    attention(Q, K, V)_i = sum_j softmax_j(Q_i . K_j / sqrt(head_dim)) V_j,

where the softmax runs over the keys j allowed by `key_mask`. In the efficient and reference
functions, logits, the softmax and its accumulators are float32 whatever the input dtype; the
two matrix products take the input dtype as operands and results (bfloat16 in mixed
precision), in the backward pass too. cuDNN keeps its softmax statistics in float32 as well.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp

# Finite stand-in for -inf: a fully masked chunk then gives exp(0) = 1 weights that the running
# maximum rescales to exactly 0 as soon as a valid key is seen (exp(min - finite) = 0).
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def _check_qkv(query: chex.Array, key: chex.Array, value: chex.Array, key_mask) -> None:
    chex.assert_rank([query, key, value], 4)
    chex.assert_equal_shape_prefix([query, key, value], 1)
    chex.assert_equal_shape_prefix([key, value], 3)
    chex.assert_equal_shape_suffix([query, key], 2)
    if key_mask is not None:
        chex.assert_shape(key_mask, key.shape[:2])


def _product(subscripts: str, a: chex.Array, b: chex.Array) -> chex.Array:
    """A matrix product in the operands' dtype, returned as float32.

    Not `preferred_element_type=float32`: its transpose in the backward pass would multiply a
    float32 cotangent with a bfloat16 operand; this way both passes run in the input dtype.
    """
    return jnp.einsum(subscripts, a, b).astype(jnp.float32)


def _logits(query: chex.Array, key: chex.Array) -> chex.Array:
    """Q K^T / sqrt(d) in float32, `(batch, heads, q_length, kv_length)`."""
    return _product("bqhd,bkhd->bhqk", query, key) * (1.0 / math.sqrt(query.shape[-1]))


def dot_product_attention_reference(
    query: chex.Array,
    key: chex.Array,
    value: chex.Array,
    *,
    key_mask: chex.Array | None = None,
) -> chex.Array:
    """Plain softmax attention; memory O(q_length * kv_length). The reference for tests.

    Args:
      query: `(batch, q_length, heads, head_dim)`.
      key: `(batch, kv_length, heads, head_dim)`.
      value: `(batch, kv_length, heads, value_dim)`.
      key_mask: optional bool `(batch, kv_length)`, False for padding keys.

    Returns:
      `(batch, q_length, heads, value_dim)` in `query.dtype`.
    """
    _check_qkv(query, key, value, key_mask)
    logits = _logits(query, key)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    out = _product("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
    return out.astype(query.dtype)


def _pad_axis1(x: chex.Array, length: int) -> chex.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _to_chunks(x: chex.Array, chunk: int) -> chex.Array:
    """`(batch, n * chunk, ...)` -> `(n, batch, chunk, ...)` for scanning over chunks."""
    b, length = x.shape[:2]
    x = x.reshape(b, length // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _attend_query_chunk(
    query: chex.Array, key_chunks: chex.Array, value_chunks: chex.Array, mask_chunks: chex.Array
) -> chex.Array:
    """Attention of one query chunk over all key chunks by the running log-sum-exp.

    Rabe & Staats (2021), Sec. 3: with running maximum m, normaliser l and numerator a,
    a key chunk with logits s updates m' = max(m, max_j s_j), l' = l e^{m-m'} + sum_j e^{s_j-m'},
    a' = a e^{m-m'} + sum_j e^{s_j-m'} v_j; the output is a / l. Each step is checkpointed so
    the backward pass recomputes the `(chunk, chunk)` logits instead of storing them.

    Args:
      query: `(batch, q_chunk, heads, head_dim)`.
      key_chunks: `(n_kv_chunks, batch, kv_chunk, heads, head_dim)`.
      value_chunks: `(n_kv_chunks, batch, kv_chunk, heads, value_dim)`.
      mask_chunks: bool `(n_kv_chunks, batch, kv_chunk)`.

    Returns:
      `(batch, q_chunk, heads, value_dim)` in float32.
    """
    b, q_len, h, _ = query.shape
    dv = value_chunks.shape[-1]

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def step(carry, chunk):
        running_max, normaliser, numerator = carry
        key, value, mask = chunk
        logits = jnp.where(mask[:, None, None, :], _logits(query, key), _MASK_VALUE)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        correction = jnp.exp(running_max - new_max)
        weights = jnp.exp(logits - new_max[..., None])
        normaliser = normaliser * correction + jnp.sum(weights, axis=-1)
        numerator = numerator * correction[..., None] + _product(
            "bhqk,bkhd->bhqd", weights.astype(value.dtype), value
        )
        return (new_max, normaliser, numerator), None

    init = (
        jnp.full((b, h, q_len), _MASK_VALUE, jnp.float32),
        jnp.zeros((b, h, q_len), jnp.float32),
        jnp.zeros((b, h, q_len, dv), jnp.float32),
    )
    (_, normaliser, numerator), _ = jax.lax.scan(
        step, init, (key_chunks, value_chunks, mask_chunks)
    )
    out = numerator / normaliser[..., None]
    return jnp.transpose(out, (0, 2, 1, 3))


def efficient_dot_product_attention(
    query: chex.Array,
    key: chex.Array,
    value: chex.Array,
    *,
    key_mask: chex.Array | None = None,
    query_chunk_size: int = 1024,
    key_chunk_size: int = 1024,
) -> chex.Array:
    """Memory-efficient softmax attention (Rabe & Staats, arXiv 2112.05682).

    Queries are processed in chunks of `query_chunk_size` and, for each, keys in chunks of
    `key_chunk_size` with a running log-sum-exp, so no `(q_length, kv_length)` matrix is ever
    built. Each query chunk and each key step is checkpointed: forward + backward need
    O(length * heads * head_dim + chunk^2 * heads) memory, linear in the length. Lengths that
    are not chunk multiples are zero-padded and the padded keys masked out.

    Equal to `dot_product_attention_reference` (to float32 rounding), gradients included.
    Queries whose keys are all masked get the mean of the values (padding included): give
    every query at least one valid key.

    Args:
      query: `(batch, q_length, heads, head_dim)`.
      key: `(batch, kv_length, heads, head_dim)`.
      value: `(batch, kv_length, heads, value_dim)`.
      key_mask: optional bool `(batch, kv_length)`, False for padding keys.
      query_chunk_size: queries per chunk (capped at q_length).
      key_chunk_size: keys per chunk (capped at kv_length).

    Returns:
      `(batch, q_length, heads, value_dim)` in `query.dtype`.
    """
    _check_qkv(query, key, value, key_mask)
    if query_chunk_size < 1 or key_chunk_size < 1:
        raise ValueError(
            "efficient_dot_product_attention: query_chunk_size and key_chunk_size must be >= 1, "
            f"got {query_chunk_size} and {key_chunk_size}."
        )
    b, q_len = query.shape[:2]
    kv_len = key.shape[1]
    q_chunk = min(query_chunk_size, q_len)
    kv_chunk = min(key_chunk_size, kv_len)
    q_padded = -(-q_len // q_chunk) * q_chunk
    kv_padded = -(-kv_len // kv_chunk) * kv_chunk

    valid = jnp.ones((b, kv_len), bool) if key_mask is None else key_mask.astype(bool)
    key_chunks = _to_chunks(_pad_axis1(key, kv_padded), kv_chunk)
    value_chunks = _to_chunks(_pad_axis1(value, kv_padded), kv_chunk)
    mask_chunks = _to_chunks(_pad_axis1(valid, kv_padded), kv_chunk)
    query_chunks = _to_chunks(_pad_axis1(query, q_padded), q_chunk)

    attend = jax.checkpoint(
        lambda q: _attend_query_chunk(q, key_chunks, value_chunks, mask_chunks),
        prevent_cse=False,
    )
    out = jax.lax.map(attend, query_chunks)  # (n_q_chunks, batch, q_chunk, heads, value_dim)
    out = jnp.moveaxis(out, 0, 1).reshape(b, q_padded, *out.shape[3:])
    return out[:, :q_len].astype(query.dtype)


# cuDNN flash attention's limits as jax 0.10 checks them (jax/_src/cudnn/
# fused_attention_stablehlo.py: check_layout, check_is_flash_attention): fp16/bf16 operands of one
# dtype, value_dim == head_dim, head_dim a multiple of 8 and at most 256 (128 before Hopper; jax
# raises at trace time there and the dispatcher falls back).
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 256
_IMPLEMENTATIONS = ("cudnn", "efficient")


def _attention_implementation(
    backend: str,
    dtypes: tuple,
    head_dim: int,
    value_dim: int,
    has_key_mask: bool = False,
) -> str:
    """The implementation `dot_product_attention` tries first: "cudnn" or "efficient".

    "cudnn" exactly when the backend is "gpu", query, key and value share one dtype, bfloat16
    or float16, `head_dim == value_dim`, `head_dim` is a multiple of 8 and at most 256, and
    padding (if any) comes as lengths, not as an arbitrary `key_mask`; "efficient" otherwise
    (float32 inputs, CPU, TPU, other shapes).
    """
    dtype_set = {jnp.dtype(d) for d in dtypes}
    cudnn = (
        backend == "gpu"
        and len(dtype_set) == 1
        and dtype_set <= set(_CUDNN_DTYPES)
        and head_dim == value_dim
        and head_dim % 8 == 0
        and head_dim <= _CUDNN_MAX_HEAD_DIM
        and not has_key_mask
    )
    return "cudnn" if cudnn else "efficient"


def _cudnn_attention(query, key, value, key_lengths) -> chex.Array:
    """cuDNN flash attention; padding as `key_value_seq_lengths`, no mask tensor built."""
    lengths = None if key_lengths is None else jnp.asarray(key_lengths).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        query, key, value, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def dot_product_attention(
    query: chex.Array,
    key: chex.Array,
    value: chex.Array,
    *,
    key_mask: chex.Array | None = None,
    key_lengths: chex.Array | None = None,
    implementation: str | None = None,
) -> chex.Array:
    """Softmax attention by cuDNN flash attention on GPU, by the efficient one elsewhere.

    `implementation=None` (the default, used by `UNet`) chooses:
    - "cudnn", `jax.nn.dot_product_attention(..., implementation="cudnn")`, when the default
      backend is GPU, query, key and value are all bfloat16 or all float16, `value_dim ==
      head_dim`, `head_dim` is a multiple of 8 and at most 256, and padding, if any, is given
      as `key_lengths` (passed to cuDNN as `key_value_seq_lengths`). If cuDNN still rejects
      the call when traced (no cuDNN found, head_dim > 128 before Hopper, ...), it falls back
      to "efficient". Errors that cuDNN raises only when XLA compiles are not caught.
    - "efficient", `efficient_dot_product_attention` with the default chunks (linear memory),
      in every other case: float32 inputs, CPU, TPU, other shapes, or an arbitrary `key_mask`.
    Never XLA's quadratic attention. `implementation="cudnn"` or "efficient" forces one, with
    no fallback (cuDNN's own error if it cannot run).

    Args:
      query: `(batch, q_length, heads, head_dim)`.
      key: `(batch, kv_length, heads, head_dim)`.
      value: `(batch, kv_length, heads, value_dim)`.
      key_mask: optional bool `(batch, kv_length)`, False for padding keys, any pattern;
        always the efficient path.
      key_lengths: optional int `(batch,)`, the number of valid keys per sample, in
        [1, kv_length]: keys `length..kv_length-1` are padding. Either this or `key_mask`.
      implementation: None, "cudnn" or "efficient".

    Returns:
      `(batch, q_length, heads, value_dim)` in `query.dtype`.
    """
    _check_qkv(query, key, value, key_mask)
    if implementation is not None and implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            "dot_product_attention: implementation must be None, 'cudnn' or 'efficient', "
            f"got {implementation!r}."
        )
    if key_lengths is not None:
        if key_mask is not None:
            raise ValueError(
                "dot_product_attention: pass padding as key_mask or as key_lengths, not both."
            )
        chex.assert_shape(key_lengths, (query.shape[0],))
    if implementation == "cudnn":
        if key_mask is not None:
            raise ValueError(
                "dot_product_attention: implementation='cudnn' takes padding as key_lengths "
                "(valid keys first), not as key_mask; pass key_lengths or use 'efficient'."
            )
        return _cudnn_attention(query, key, value, key_lengths)
    if implementation is None:
        choice = _attention_implementation(
            jax.default_backend(),
            (query.dtype, key.dtype, value.dtype),
            query.shape[-1],
            value.shape[-1],
            has_key_mask=key_mask is not None,
        )
        if choice == "cudnn":
            try:
                return _cudnn_attention(query, key, value, key_lengths)
            except (NotImplementedError, RuntimeError):
                pass  # jax's trace-time check rejected this call for cuDNN: fall back.
    if key_lengths is not None:
        key_mask = jnp.arange(key.shape[1])[None, :] < jnp.asarray(key_lengths)[:, None]
    return efficient_dot_product_attention(query, key, value, key_mask=key_mask)
