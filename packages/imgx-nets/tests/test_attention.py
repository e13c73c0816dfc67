"""Memory-efficient attention equals plain softmax attention; its memory grows linearly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgx_nets import attention as attention_module
from imgx_nets import (
    dot_product_attention,
    dot_product_attention_reference,
    efficient_dot_product_attention,
)
from imgx_nets.attention import _attention_implementation


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


def test_default_chunks_and_dispatcher_equal_reference():
    q, k, v = _qkv(19, 23, dv=8)
    ref = dot_product_attention_reference(q, k, v)
    _assert_close(efficient_dot_product_attention(q, k, v), ref)
    _assert_close(dot_product_attention(q, k, v, implementation="efficient"), ref)
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
    for name in ("flash", "fused", "xla"):
        with pytest.raises(ValueError, match="implementation"):
            dot_product_attention(q, k, v, implementation=name)
    mask, lengths = jnp.ones((2, 4), bool), jnp.array([4, 2])
    with pytest.raises(ValueError, match="not both"):
        dot_product_attention(q, k, v, key_mask=mask, key_lengths=lengths)
    with pytest.raises(ValueError, match="key_lengths"):
        dot_product_attention(q, k, v, key_mask=mask, implementation="cudnn")
    with pytest.raises(AssertionError):
        dot_product_attention(q, k, v, key_lengths=jnp.array([4, 2, 1]))
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


# -- backend dispatch --------------------------------------------------------------------------

_BF16, _F16, _F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize(
    ("backend", "dtypes", "head_dim", "value_dim", "has_key_mask", "expected"),
    [
        ("gpu", (_BF16,) * 3, 64, 64, False, "cudnn"),  # the UNet's bottom: 256 / 4
        ("gpu", (_F16,) * 3, 8, 8, False, "cudnn"),
        ("gpu", (_BF16,) * 3, 256, 256, False, "cudnn"),
        ("gpu", (_F32,) * 3, 64, 64, False, "efficient"),  # cuDNN: fp16/bf16 only
        ("gpu", (_BF16, _BF16, _F32), 64, 64, False, "efficient"),  # mixed dtypes
        ("gpu", (_BF16,) * 3, 60, 60, False, "efficient"),  # not a multiple of 8
        ("gpu", (_BF16,) * 3, 512, 512, False, "efficient"),  # above 256
        ("gpu", (_BF16,) * 3, 64, 32, False, "efficient"),  # value_dim != head_dim
        ("gpu", (_BF16,) * 3, 64, 64, True, "efficient"),  # arbitrary mask, not lengths
        ("cpu", (_BF16,) * 3, 64, 64, False, "efficient"),
        ("tpu", (_BF16,) * 3, 64, 64, False, "efficient"),
    ],
)
def test_attention_implementation_choice(
    backend, dtypes, head_dim, value_dim, has_key_mask, expected
):
    assert _attention_implementation(backend, dtypes, head_dim, value_dim, has_key_mask) == (
        expected
    )


def _lengths_to_mask(lengths, kv_len):
    return jnp.arange(kv_len)[None, :] < lengths[:, None]


_KEY_LENGTHS = jnp.array([29, 11], jnp.int32)


def _loss_with_lengths(attention, q, k, v, lengths):
    w = jax.random.normal(jax.random.key(42), (v.shape[-1],))
    return jnp.sum(jnp.sin(attention(q, k, v, key_lengths=lengths) @ w))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU/TPU dispatch")
def test_dispatcher_uses_efficient_path_off_gpu_with_padding(monkeypatch):
    calls = []
    original = attention_module.efficient_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module, "efficient_dot_product_attention", spy)
    q, k, v = _qkv(37, 29, dv=8)
    mask = _lengths_to_mask(_KEY_LENGTHS, 29)
    loss = functools.partial(_loss_with_lengths, dot_product_attention)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v, _KEY_LENGTHS)
    assert len(calls) == 1  # traced once, through the efficient path
    assert calls[0]["key_mask"].shape == (2, 29)
    ref_value, ref_grads = _value_and_grad["reference"](q, k, v, mask)
    _assert_close(value, ref_value)
    for g, rg in zip(grads, ref_grads, strict=True):
        _assert_close(g, rg)
    assert np.all(np.asarray(grads[1])[1, 11:] == 0)  # padding keys get no gradient
    # bfloat16 goes the same way off GPU: never cuDNN, never XLA's quadratic attention
    out16 = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out16.dtype == jnp.bfloat16 and len(calls) == 2


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a machine without cuDNN")
def test_dispatcher_falls_back_when_cudnn_rejects_at_trace_time(monkeypatch):
    # Pretend the choice is cuDNN: jax raises "cuDNN is not detected" while tracing, and the
    # dispatcher must fall back to the efficient path rather than fail.
    monkeypatch.setattr(attention_module, "_attention_implementation", lambda *a, **k: "cudnn")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(13, 11, dv=8))
    lengths = jnp.array([11, 4], jnp.int32)
    out = jax.jit(functools.partial(dot_product_attention, key_lengths=lengths))(q, k, v)
    expected = efficient_dot_product_attention(q, k, v, key_mask=_lengths_to_mask(lengths, 11))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    # forcing cuDNN does not fall back
    with pytest.raises(RuntimeError, match="cuDNN"):
        dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="cuDNN attention needs a GPU (conftest defaults JAX_PLATFORMS to cpu: set it to cuda)",
)
def test_cudnn_equals_efficient_and_reference_in_bfloat16():
    # 8 heads of 64 as in the UNet's bottom; lengths not multiples of anything; padding.
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(37, 29, heads=8, dim=64, dv=64))
    mask = _lengths_to_mask(_KEY_LENGTHS, 29)
    auto = jax.jit(functools.partial(dot_product_attention, key_lengths=_KEY_LENGTHS))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    assert "__cudnn$fmha" in auto.lower(q, k, v).as_text()  # the default picks cuDNN
    assert "__cudnn$fmha" not in auto.lower(q32, k32, v32).as_text()  # float32: efficient

    def run(implementation):
        fn = functools.partial(dot_product_attention, implementation=implementation)
        loss = functools.partial(_loss_with_lengths, fn)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v, _KEY_LENGTHS)

    _, ref_grads = _value_and_grad["reference"](q32, k32, v32, mask)
    ref_out = dot_product_attention_reference(q32, k32, v32, key_mask=mask)
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 ~ 4e-3); the products' operands
    # and the output are rounded to it: a few steps of the largest entry.
    for implementation in ("cudnn", "efficient"):
        out = dot_product_attention(
            q, k, v, key_lengths=_KEY_LENGTHS, implementation=implementation
        )
        assert out.dtype == jnp.bfloat16
        _assert_close(out.astype(jnp.float32), ref_out, rtol=2e-2)
        _, grads = run(implementation)
        for g, rg in zip(grads, ref_grads, strict=True):
            _assert_close(g.astype(jnp.float32), rg, rtol=3e-2)
    cudnn = dot_product_attention(q, k, v, key_lengths=_KEY_LENGTHS, implementation="cudnn")
    efficient = dot_product_attention(q, k, v, key_lengths=_KEY_LENGTHS, implementation="efficient")
    _assert_close(cudnn.astype(jnp.float32), efficient.astype(jnp.float32), rtol=2e-2)
