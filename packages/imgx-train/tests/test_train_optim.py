"""Optimizer against closed forms: warm-up + cosine schedule, global-norm clipping, AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgx_train import optim
from imgx_train.config import OptimizerConfig


def test_learning_rate_schedule_warm_up_and_cosine_ends():
    """lr = init + (peak − init)·s/W, then end + (peak − end)·½(1 + cos(π·(s − W)/D))."""
    cfg = OptimizerConfig(
        init_lr=1e-5, peak_lr=8e-4, warmup_steps=100, decay_steps=10_000, end_lr=5e-5
    )
    lr = optim.learning_rate_schedule(cfg)
    init, peak, end, w, d = 1e-5, 8e-4, 5e-5, 100, 10_000
    expected = {
        0: init,
        50: init + (peak - init) * 0.5,
        w: peak,  # end of the warm-up
        w + d // 4: end + (peak - end) * 0.5 * (1 + math.cos(math.pi / 4)),
        w + d // 2: (peak + end) / 2,
        w + d: end,  # end of the cosine
        3 * (w + d): end,  # and flat afterwards
    }
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, rel=1e-5), step


def _adamw(params, grads_seq, lrs, b1, b2, wd, eps=1e-8):
    """AdamW in float64 (Loshchilov & Hutter; optax's order: Adam, + wd·θ, × −lr)."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            params[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * params[k])
    return params


def test_global_norm_clipping_and_adamw_two_steps():
    """g₁ has global norm 5 over two leaves: it is scaled by 1/5 as a whole (per-leaf
    clipping would scale the leaves by 1/3 and 1/4); g₂ (norm 0.3) is left alone. The
    second Adam step depends on the ratio of g₁ to g₂, so it sees the clipping.
    """
    cfg = OptimizerConfig(
        init_lr=0.1,
        peak_lr=0.2,
        warmup_steps=1,
        decay_steps=4,
        end_lr=0.01,
        weight_decay=0.01,
        clip_norm=1.0,
    )
    tx = optim.optimizer(cfg)
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    g1 = {"a": np.array([3.0, 0.0]), "b": np.array([4.0])}
    g2 = {"a": np.array([0.1, 0.2]), "b": np.array([-0.2])}
    state = tx.init(params)
    current = params
    for g in (g1, g2):
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, current)
        current = jax.tree.map(lambda p, u: p + u, current, updates)
    clipped = {k: v / 5.0 for k, v in g1.items()}
    expected = _adamw(params, [clipped, g2], [0.1, 0.2], cfg.b1, cfg.b2, cfg.weight_decay)
    for k in params:
        np.testing.assert_allclose(np.asarray(current[k]), expected[k], rtol=1e-5)
    per_leaf = {"a": g1["a"] / 3.0, "b": g1["b"] / 4.0}
    wrong = _adamw(params, [per_leaf, g2], [0.1, 0.2], cfg.b1, cfg.b2, cfg.weight_decay)
    assert not np.allclose(wrong["a"], expected["a"], rtol=1e-3)

    # A non-finite gradient: no update, and it is counted.
    nan = {"a": jnp.array([jnp.nan, 0.0]), "b": jnp.array([1.0])}
    updates, state = tx.update(nan, state, current)
    for k in params:
        np.testing.assert_array_equal(np.asarray(updates[k]), 0.0)
    assert int(state.total_notfinite) == 1
    assert int(state.notfinite_count) == 1
