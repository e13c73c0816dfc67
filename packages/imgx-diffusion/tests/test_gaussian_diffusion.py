"""Gaussian diffusion quantities against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import imgx_diffusion as idf

BETAS = idf.beta_schedule("linear", 1001)
BASE = idf.GaussianDiffusion.from_betas(BETAS)
DIFF = BASE.respace(5)
SHAPE = (5, 4, 4, 3)


def _x0(key=0):
    """A mask encoding in {−1, 1}."""
    return jnp.where(jax.random.bernoulli(jax.random.key(key), 0.5, SHAPE), 1.0, -1.0)


def test_invalid_names_are_clear_errors():
    with pytest.raises(ValueError, match="model_output"):
        idf.GaussianDiffusion.from_betas(BETAS, model_output="score")
    with pytest.raises(ValueError, match="variance"):
        idf.GaussianDiffusion.from_betas(BETAS, variance="learned")


def test_model_time_is_base_index_over_n():
    t = jnp.arange(5)
    np.testing.assert_allclose(
        DIFF.model_time(t), (np.array([0, 250, 500, 750, 1000]) + 1) / 1001, rtol=1e-6
    )
    np.testing.assert_allclose(BASE.model_time(jnp.array([0, 1000])), [1 / 1001, 1.0], rtol=1e-6)


def test_q_sample_monte_carlo_mean_and_variance():
    n = 20000
    x0 = jnp.full((n, 1), 0.7)
    t = jnp.full((n,), 2)
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    xt = DIFF.q_sample(x0, noise, t)
    a = DIFF.alphas_cumprod[2]
    assert float(jnp.mean(xt)) == pytest.approx(math.sqrt(a) * 0.7, abs=4 / math.sqrt(n))
    assert float(jnp.var(xt)) == pytest.approx(1 - a, rel=0.05)
    mean, var, _ = DIFF.q_mean_variance(x0[:1], t[:1])
    np.testing.assert_allclose(mean, math.sqrt(a) * 0.7, rtol=1e-6)
    np.testing.assert_allclose(var, 1 - a, rtol=1e-6)


@pytest.mark.parametrize("t_value", [0, 1, 4])
def test_conversions_are_inverses(t_value):
    x0 = jax.random.normal(jax.random.key(2), SHAPE)
    eps = jax.random.normal(jax.random.key(3), SHAPE)
    t = jnp.full((SHAPE[0],), t_value)
    xt = DIFF.q_sample(x0, eps, t)
    np.testing.assert_allclose(DIFF.predict_x0_from_epsilon(xt, eps, t), x0, atol=2e-4)
    np.testing.assert_allclose(DIFF.predict_epsilon_from_x0(xt, x0, t), eps, atol=1e-4)
    v = DIFF.predict_v(x0, eps, t)
    np.testing.assert_allclose(DIFF.predict_x0_from_v(xt, v, t), x0, atol=1e-5)
    np.testing.assert_allclose(DIFF.predict_epsilon_from_v(xt, v, t), eps, atol=1e-5)


def test_posterior_matches_gaussian_product():
    # q(x_{t−1}|x_0) = N(√ᾱ_prev x_0, 1−ᾱ_prev), q(x_t|x_{t−1}) = N(√α x_{t−1}, β):
    # the posterior precision is 1/(1−ᾱ_prev) + α/β.
    x0 = jax.random.normal(jax.random.key(4), SHAPE)
    xt = jax.random.normal(jax.random.key(5), SHAPE)
    for t_value in range(1, 5):
        t = jnp.full((SHAPE[0],), t_value)
        beta, a_prev = DIFF.betas[t_value], DIFF.alphas_cumprod[t_value - 1]
        var = 1.0 / (1.0 / (1.0 - a_prev) + (1.0 - beta) / beta)
        mean = var * (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(1 - beta) * xt / beta)
        got_mean, got_var, got_log_var = DIFF.q_posterior_mean_variance(x0, xt, t)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_var, var, rtol=1e-5)
        np.testing.assert_allclose(got_log_var, math.log(var), rtol=1e-5)
    # t = 0: the mean is x_0 and the log variance is clipped to that of t = 1.
    t0 = jnp.zeros((SHAPE[0],), jnp.int32)
    got_mean, got_var, got_log_var = DIFF.q_posterior_mean_variance(x0, xt, t0)
    np.testing.assert_allclose(got_mean, x0, atol=1e-6)
    np.testing.assert_allclose(got_var, 0.0, atol=1e-12)
    np.testing.assert_allclose(got_log_var, math.log(DIFF.posterior_variance[1]), rtol=1e-6)


def test_fixed_and_learned_variances():
    small = DIFF
    large = idf.GaussianDiffusion.from_betas(BETAS, variance="fixed_large").respace(5)
    learned = idf.GaussianDiffusion.from_betas(BETAS, variance="learned_range").respace(5)
    np.testing.assert_allclose(small.fixed_log_variance, small.posterior_log_variance_clipped)
    expected_large = np.log(np.r_[DIFF.posterior_variance[1], DIFF.betas[1:]])
    np.testing.assert_allclose(large.fixed_log_variance, expected_large)
    t = jnp.arange(5)
    u = jnp.ones((5, 1))
    np.testing.assert_allclose(learned.learned_log_variance(u, t)[:, 0], np.log(DIFF.betas), 1e-5)
    np.testing.assert_allclose(
        learned.learned_log_variance(-u, t)[:, 0], DIFF.posterior_log_variance_clipped, rtol=1e-5
    )
    with pytest.raises(ValueError, match="log_variance"):
        learned.ddpm_step(jax.random.key(0), u, u, t)


def test_ddim_eta0_with_oracle_returns_x0_exactly():
    x0 = _x0()
    x = jax.random.normal(jax.random.key(6), SHAPE)
    for k in range(4, -1, -1):
        x = DIFF.ddim_step(None, x0, x, jnp.full((SHAPE[0],), k), eta=0.0)
    np.testing.assert_allclose(x, x0, atol=1e-5)


def test_ddpm_with_oracle_converges_to_x0():
    x0 = _x0()
    key = jax.random.key(7)
    x = jax.random.normal(key, SHAPE)
    for k in range(4, -1, -1):
        key, sub = jax.random.split(key)
        x = DIFF.ddpm_step(sub, x0, x, jnp.full((SHAPE[0],), k))
    # The last step (t = 0) is the noiseless posterior mean, which is x̂_0 itself.
    np.testing.assert_allclose(x, x0, atol=1e-5)


def test_ddim_eta1_noise_has_posterior_variance():
    # With eta = 1 σ_t² = σ̃²_t, the DDPM posterior variance (Song et al. 2021, §4.1).
    t = jnp.arange(1, 5)
    sigma = DIFF.ddim_sigma(t, jnp.zeros((4, 1)), 1.0)[:, 0]
    np.testing.assert_allclose(sigma**2, DIFF.posterior_variance[1:], rtol=1e-5)
    n = 20000
    x0, xt = jnp.full((n, 1), 0.3), jnp.full((n, 1), -0.2)
    tt = jnp.full((n,), 3)
    samples = DIFF.ddim_step(jax.random.key(8), x0, xt, tt, eta=1.0)
    deterministic = DIFF.ddim_step(None, x0, xt, tt, eta=0.0)
    assert float(jnp.var(samples)) == pytest.approx(DIFF.posterior_variance[3], rel=0.05)
    # The mean moves by the reduced ε coefficient √(1−ᾱ_prev−σ²) instead of √(1−ᾱ_prev).
    a, a_prev = DIFF.alphas_cumprod[3], DIFF.alphas_cumprod[2]
    eps = (-0.2 - math.sqrt(a) * 0.3) / math.sqrt(1 - a)
    mean = math.sqrt(a_prev) * 0.3 + math.sqrt(1 - a_prev - DIFF.posterior_variance[3]) * eps
    assert float(jnp.mean(samples)) == pytest.approx(mean, abs=0.02)
    assert float(deterministic[0, 0]) == pytest.approx(
        math.sqrt(a_prev) * 0.3 + math.sqrt(1 - a_prev) * eps, rel=1e-5
    )


def test_dpm_solver_2m_step():
    x0 = jax.random.normal(jax.random.key(9), SHAPE)
    x0_previous = jax.random.normal(jax.random.key(10), SHAPE)
    xt = jax.random.normal(jax.random.key(11), SHAPE)
    for k in range(5):
        t = jnp.full((SHAPE[0],), k)
        # First order is DDIM with eta = 0 (Lu et al. 2022, §4.1).
        np.testing.assert_allclose(
            DIFF.dpm_solver_2m_step(x0, xt, t), DIFF.ddim_step(None, x0, xt, t), atol=1e-5
        )
    # Second order at an inner step, from λ = log(√ᾱ/√(1−ᾱ)).
    a = np.asarray(DIFF.alphas_cumprod)
    lam = 0.5 * np.log(a / (1 - a))
    k = 2
    h, h_last = lam[k - 1] - lam[k], lam[k] - lam[k + 1]
    r = h_last / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_previous
    expected = (
        math.sqrt((1 - a[k - 1]) / (1 - a[k])) * xt + math.sqrt(a[k - 1]) * (1 - math.exp(-h)) * d
    )
    got = DIFF.dpm_solver_2m_step(x0, xt, jnp.full((SHAPE[0],), k), x0_previous)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # The last step returns x̂_0 whatever the previous prediction.
    t0 = jnp.zeros((SHAPE[0],), jnp.int32)
    np.testing.assert_allclose(DIFF.dpm_solver_2m_step(x0, xt, t0, x0_previous), x0, atol=1e-6)


def test_variational_bound_closed_forms_and_gradient_only_into_variance():
    x0 = _x0()
    xt = jax.random.normal(jax.random.key(12), SHAPE)
    t = jnp.array([0, 1, 2, 3, 4])
    learned = idf.GaussianDiffusion.from_betas(BETAS, variance="learned_range").respace(5)
    # A perfect x̂_0 with the posterior variance (u = −1): KL = 0 at t > 0.
    log_var = learned.learned_log_variance(-jnp.ones(SHAPE), t)
    vlb = learned.variational_bound(x0, xt, t, x0, log_var)
    np.testing.assert_allclose(vlb[1:], 0.0, atol=1e-5)
    # t = 0: −log Φ(x_0 μ/σ) with μ = x̂_0 (the posterior mean at t = 0), in bits.
    sigma = math.sqrt(DIFF.posterior_variance[1])
    expected = -stats.norm.logcdf(1.0 / sigma) / math.log(2.0)
    assert float(vlb[0]) == pytest.approx(expected, rel=1e-4)
    # A wrong x̂_0 with a larger variance, by hand for t = 2.
    x0_pred = 0.5 * x0
    log_var = learned.learned_log_variance(jnp.zeros(SHAPE), t)
    vlb = learned.variational_bound(x0, xt, t, x0_pred, log_var)
    m1, _, lv1 = DIFF.q_posterior_mean_variance(x0, xt, t)
    m2, _, _ = DIFF.q_posterior_mean_variance(x0_pred, xt, t)
    kl = idf.normal_kl(m1, lv1, m2, log_var)
    assert float(vlb[2]) == pytest.approx(float(jnp.mean(kl[2])) / math.log(2.0), rel=1e-5)

    def total(x0_pred, log_var):
        return jnp.sum(learned.variational_bound(x0, xt, t, x0_pred, log_var))

    grad_mean, grad_var = jax.grad(total, argnums=(0, 1))(x0_pred, log_var)
    assert float(jnp.max(jnp.abs(grad_mean))) == 0.0
    assert float(jnp.max(jnp.abs(grad_var))) > 0.0


def test_usable_inside_jit_as_argument_or_constant():
    x0 = _x0()
    noise = jax.random.normal(jax.random.key(13), SHAPE)
    t = jnp.arange(5)

    @jax.jit
    def as_argument(diffusion, x0, noise, t):
        return diffusion.q_sample(x0, noise, t), diffusion.model_time(t)

    @jax.jit
    def as_constant(x0, noise, t):
        return DIFF.q_sample(x0, noise, t), DIFF.model_time(t)

    for got in (as_argument(DIFF, x0, noise, t), as_constant(x0, noise, t)):
        np.testing.assert_allclose(got[0], DIFF.q_sample(x0, noise, t), atol=1e-5)
        np.testing.assert_allclose(got[1], DIFF.model_time(t))


def test_bfloat16_inputs_are_computed_in_float32():
    # In bfloat16 ᾱ_0 = 0.9999 rounds to 1 and √(1 − ᾱ_0) to 0: the arithmetic must promote.
    x0 = _x0().astype(jnp.bfloat16)
    eps = jax.random.normal(jax.random.key(14), SHAPE, jnp.bfloat16)
    t = jnp.zeros((SHAPE[0],), jnp.int32)
    xt = DIFF.q_sample(x0, eps, t)
    assert xt.dtype == jnp.float32
    np.testing.assert_allclose(DIFF.predict_x0_from_epsilon(xt, eps, t), x0, atol=1e-4)
