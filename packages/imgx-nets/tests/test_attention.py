"""Memory-efficient attention equals plain softmax attention; its memory grows linearly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgx_nets import (
    dot_product_attention,
    dot_product_attention_reference,
    efficient_dot_product_attention,
)


def _qkv(q_len, kv_len, batch=2, heads=3, dim=8, dv=5, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (batch, q_len, heads, dim)),
        jax.random.normal(kk, (batch, kv_len, heads, dim)),
        jax.random.normal(kv, (batch, kv_len, heads, dv)),
    )


def _loss(attention, q, k, v, mask):
    # A fixed random projection so every output entry carries gradient.
    w = jax.random.normal(jax.random.key(42), (v.shape[-1],))
    return jnp.sum(jnp.sin(attention(q, k, v, key_mask=mask) @ w))


_efficient = functools.partial(
    efficient_dot_product_attention, query_chunk_size=8, key_chunk_size=16
)
_value_and_grad = {
    name: jax.jit(jax.value_and_grad(functools.partial(_loss, fn), argnums=(0, 1, 2)))
    for name, fn in (("efficient", _efficient), ("reference", dot_product_attention_reference))
}


def _assert_close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("use_mask", [False, True])
def test_efficient_equals_plain_values_and_gradients(use_mask):
    # Lengths 37 and 29 are not multiples of the chunks (8, 16): padding is masked out.
    q, k, v = _qkv(37, 29)
    mask = None
    if use_mask:
        mask = jnp.arange(29)[None, :] < jnp.array([[29], [11]])
    out = jax.jit(_efficient)(q, k, v, key_mask=mask)
    ref = dot_product_attention_reference(q, k, v, key_mask=mask)
    assert out.shape == (2, 37, 3, 5)
    _assert_close(out, ref)
    (loss, grads) = _value_and_grad["efficient"](q, k, v, mask)
    (ref_loss, ref_grads) = _value_and_grad["reference"](q, k, v, mask)
    _assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads, strict=True):
        _assert_close(g, rg)
    if use_mask:
        # Masked keys get exactly zero gradient.
        assert np.all(np.asarray(grads[1])[1, 11:] == 0)


def test_masked_keys_do_not_matter():
    q, k, v = _qkv(5, 12)
    mask = jnp.arange(12)[None, :] < 7
    changed = v.at[:, 7:].set(100.0)
    out = efficient_dot_product_attention(
        q, k, v, key_mask=jnp.repeat(mask, 2, 0), key_chunk_size=4
    )
    out2 = efficient_dot_product_attention(
        q, k, changed, key_mask=jnp.repeat(mask, 2, 0), key_chunk_size=4
    )
    _assert_close(out, out2)
    _assert_close(out, dot_product_attention_reference(q[:, :, :], k[:, :7], v[:, :7]))


def test_single_key_returns_its_value():
    # softmax over one key is 1: the output is that value for every query.
    q, k, v = _qkv(6, 1)
    out = efficient_dot_product_attention(q, k, v)
    _assert_close(out, jnp.broadcast_to(v, out.shape))


def test_default_chunks_and_fused_path_equal_reference():
    q, k, v = _qkv(19, 23, dv=8)  # the fused path needs value_dim == head_dim
    ref = dot_product_attention_reference(q, k, v)
    _assert_close(efficient_dot_product_attention(q, k, v), ref)
    _assert_close(dot_product_attention(q, k, v, implementation="fused"), ref)
    _assert_close(dot_product_attention(q, k, v), ref)


def test_bfloat16_operands_float32_softmax():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(9, 9))
    out = efficient_dot_product_attention(q, k, v, query_chunk_size=4, key_chunk_size=4)
    assert out.dtype == jnp.bfloat16
    ref = dot_product_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_invalid_arguments_raise():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        efficient_dot_product_attention(q, k, v, query_chunk_size=0)
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(AssertionError):
        efficient_dot_product_attention(q, k[:, :, :2], v)


def _temp_bytes(attention, length):
    shape = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention(q, k, v))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly():
    efficient = functools.partial(
        efficient_dot_product_attention, query_chunk_size=256, key_chunk_size=256
    )
    small, large = (_temp_bytes(efficient, n) for n in (1024, 4096))
    plain_small, plain_large = (
        _temp_bytes(dot_product_attention_reference, n) for n in (1024, 4096)
    )
    # 4x the tokens: linear memory grows ~4x, plain attention ~16x.
    assert large / small < 6, (small, large)
    assert plain_large / plain_small > 8, (plain_small, plain_large)
    assert large < plain_large / 4
