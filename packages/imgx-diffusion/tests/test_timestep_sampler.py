"""Uniform and importance sampling of training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imgx_diffusion as idf

SAMPLER = idf.TimestepSampler("importance")


def _history(loss_sq, count):
    return idf.TimestepSamplerState(
        loss_sq=jnp.asarray(loss_sq, jnp.float32), count=jnp.asarray(count, jnp.int32)
    )


def test_uniform_probabilities_and_weights():
    sampler = idf.TimestepSampler("uniform")
    state = sampler.init(6)
    p, in_warmup = sampler.probabilities(state, 1, 5)
    np.testing.assert_allclose(p, [0, 0.25, 0.25, 0.25, 0.25, 0])
    assert not bool(in_warmup)
    t, w = sampler.sample(jax.random.key(0), state, 1000, 1, 5)
    assert int(t.min()) == 1 and int(t.max()) == 4
    np.testing.assert_allclose(w, 1.0)


def test_warmup_draws_only_under_seen_steps_with_weight_one():
    state = _history([1.0, 1.0, 1.0, 1.0], [10, 3, 10, 0])
    p, in_warmup = SAMPLER.probabilities(state, 0, 4)
    assert bool(in_warmup)
    np.testing.assert_allclose(p, [0, 0.5, 0, 0.5])
    t, w = SAMPLER.sample(jax.random.key(1), state, 200, 0, 4)
    assert set(np.unique(t).tolist()) == {1, 3}
    np.testing.assert_allclose(w, 1.0)
    # Steps outside the range do not hold the warm-up back.
    p, in_warmup = SAMPLER.probabilities(_history([1, 4, 9, 0], [10, 10, 10, 0]), 0, 3)
    assert not bool(in_warmup)


def test_importance_probabilities_match_formula():
    loss_sq = np.array([4.0, 1.0, 9.0, 16.0, 100.0])
    state = _history(loss_sq, [10, 12, 20, 11, 0])
    p, in_warmup = SAMPLER.probabilities(state, 0, 4)  # range excludes the unseen t = 4
    assert not bool(in_warmup)
    root = np.sqrt(loss_sq[:4])
    expected = 0.99 * root / root.sum() + 0.01 / 4
    np.testing.assert_allclose(p[:4], expected, rtol=1e-6)
    assert float(p[4]) == 0.0
    t, w = SAMPLER.sample(jax.random.key(2), state, 64, 0, 4)
    np.testing.assert_allclose(w, 1.0 / (4 * expected[np.asarray(t)]), rtol=1e-5)


def test_importance_weights_make_the_estimator_unbiased():
    loss = np.array([0.5, 2.0, 8.0, 1.0, 3.0])
    state = _history(loss**2, [50] * 5)
    t, w = SAMPLER.sample(jax.random.key(3), state, 200_000, 1, 5)
    estimate = float(jnp.mean(w * jnp.asarray(loss)[t]))
    assert estimate == pytest.approx(loss[1:].mean(), rel=0.01)
    # Unweighted, the estimate is biased towards the high-loss steps.
    assert float(jnp.mean(jnp.asarray(loss)[t])) > 1.2 * loss[1:].mean()


def test_update_moving_average_and_counts():
    state = _history([0.0, 4.0, 1.0], [0, 3, 2])
    t = jnp.array([0, 0, 1, 1])
    loss = jnp.array([1.0, 3.0, 2.0, 4.0])
    new = SAMPLER.update(state, t, loss)
    # First observation initialises the average; later ones decay with 0.9.
    np.testing.assert_allclose(new.loss_sq, [5.0, 0.9 * 4.0 + 0.1 * 10.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(new.count, [2, 5, 2])


def test_state_is_a_jittable_pytree():
    @jax.jit
    def step(state, key):
        t, _ = SAMPLER.sample(key, state, 8, 0, 5)
        return SAMPLER.update(state, t, jnp.ones((8,)))

    state = SAMPLER.init(5)
    for i in range(7):
        state = step(state, jax.random.key(i))
    assert int(state.count.sum()) == 56
    assert jax.tree.structure(state) == jax.tree.structure(SAMPLER.init(5))


def test_invalid_configuration_and_range():
    with pytest.raises(ValueError, match="method"):
        idf.TimestepSampler("loss_aware")
    with pytest.raises(ValueError, match="t_min"):
        SAMPLER.probabilities(SAMPLER.init(5), 2, 7)
