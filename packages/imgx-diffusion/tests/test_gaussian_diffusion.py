"""Gaussian diffusion quantities against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imgx_diffusion as idf

BETAS = idf.beta_schedule("linear", 1001)
BASE = idf.GaussianDiffusion.from_betas(BETAS)
DIFF = BASE.respace(5)
SHAPE = (5, 4, 4, 3)
N_MC = 40000  # Monte Carlo draws; tolerances below are 5 standard errors of this size


def _normal_log_cdf(z):
    """log Φ(z) with the standard library only (no scipy dependency)."""
    return math.log(0.5 * math.erfc(-z / math.sqrt(2.0)))


def _assert_gaussian_moments(samples, mean, var, other_var=None):
    """Sample mean and variance within 5 standard errors of N(mean, var) — σ/√n for the mean,
    σ²√(2/(n−1)) for the sample variance — and, if given, other_var rejected."""
    samples = np.asarray(samples, dtype=np.float64).ravel()
    n = samples.size
    tol_var = 5.0 * var * math.sqrt(2.0 / (n - 1))
    assert abs(samples.mean() - mean) < 5.0 * math.sqrt(var / n)
    assert abs(samples.var(ddof=1) - var) < tol_var
    if other_var is not None:  # the test can tell the two variances apart
        assert abs(samples.var(ddof=1) - other_var) > tol_var


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


def test_ddim_eta0_with_oracle_follows_the_forward_path_of_one_noise():
    """With eta = 0 and x̂_0 = x_0 every step keeps ε = (x_K − √ᾱ_K x_0)/√(1 − ᾱ_K): x_{k−1}
    = √ᾱ_{k−1} x_0 + √(1 − ᾱ_{k−1}) ε at each step (Song et al. 2021, eq. 12), not only at
    the last one, which returns x_0 whatever x it is given."""
    x0 = _x0()
    eps = jax.random.normal(jax.random.key(6), SHAPE)
    a = np.asarray(DIFF.alphas_cumprod)
    x = math.sqrt(a[4]) * x0 + math.sqrt(1 - a[4]) * eps
    for k in range(4, 0, -1):
        x = DIFF.ddim_step(None, x0, x, jnp.full((SHAPE[0],), k), eta=0.0)
        expected = math.sqrt(a[k - 1]) * x0 + math.sqrt(1 - a[k - 1]) * eps
        np.testing.assert_allclose(x, expected, atol=1e-5)
        assert float(jnp.max(jnp.abs(x - x0))) > 0.01  # still noisy before the last step
    x = DIFF.ddim_step(None, x0, x, jnp.zeros((SHAPE[0],), jnp.int32), eta=0.0)
    np.testing.assert_allclose(x, x0, atol=1e-5)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_has_posterior_mean_and_fixed_variance(variance):
    # One ancestral step at t > 0 against its closed form, by Monte Carlo.
    diff = idf.GaussianDiffusion.from_betas(BETAS, variance=variance).respace(5)
    betas, a = np.asarray(diff.betas), np.asarray(diff.alphas_cumprod)
    x0_value, xt_value = 0.6, -0.3
    x0, xt = jnp.full((N_MC, 1), x0_value), jnp.full((N_MC, 1), xt_value)
    for k in (1, 2, 3):
        coef_x0 = betas[k] * math.sqrt(a[k - 1]) / (1 - a[k])
        coef_xt = math.sqrt(1 - betas[k]) * (1 - a[k - 1]) / (1 - a[k])
        mean = coef_x0 * x0_value + coef_xt * xt_value
        small, large = betas[k] * (1 - a[k - 1]) / (1 - a[k]), betas[k]
        var, other = (small, large) if variance == "fixed_small" else (large, small)
        t = jnp.full((N_MC,), k)
        np.testing.assert_allclose(jnp.exp(diff.p_log_variance(t[:1], x0[:1])), var, rtol=1e-5)
        samples = diff.ddpm_step(jax.random.key(20 + k), x0, xt, t)
        _assert_gaussian_moments(samples, mean, var, other)
    # t = 0 adds no noise: the step is the posterior mean, x̂_0 itself (an oracle's x_0).
    x0 = _x0()
    t0 = jnp.zeros((SHAPE[0],), jnp.int32)
    xt = jax.random.normal(jax.random.key(7), SHAPE)
    np.testing.assert_allclose(diff.ddpm_step(jax.random.key(8), x0, xt, t0), x0, atol=1e-5)


def test_ddpm_step_uses_the_learned_variance():
    # learned_range: the spread of x_{t−1} follows the model's log variance, not a fixed one.
    learned = idf.GaussianDiffusion.from_betas(BETAS, variance="learned_range").respace(5)
    k = 2
    betas, a = np.asarray(learned.betas), np.asarray(learned.alphas_cumprod)
    small = betas[k] * (1 - a[k - 1]) / (1 - a[k])
    x0, xt = jnp.full((N_MC, 1), 0.6), jnp.full((N_MC, 1), -0.3)
    t = jnp.full((N_MC,), k)
    mean = learned.q_posterior_mean_variance(x0[:1], xt[:1], t[:1])[0][0, 0]
    variances = []
    for u in (-1.0, 0.0, 1.0):
        frac = (u + 1) / 2
        var = math.exp(frac * math.log(betas[k]) + (1 - frac) * math.log(small))
        log_var = learned.learned_log_variance(jnp.full((N_MC, 1), u), t)
        samples = learned.ddpm_step(jax.random.key(30), x0, xt, t, log_variance=log_var)
        _assert_gaussian_moments(samples, float(mean), var, variances[-1] if variances else None)
        variances.append(var)


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


def test_ddim_step_takes_a_traced_eta():
    x0, xt = jnp.full((N_MC, 1), 0.3), jnp.full((N_MC, 1), -0.2)
    t = jnp.full((N_MC,), 3)
    key = jax.random.key(8)
    traces = []

    @jax.jit
    def step(eta):
        traces.append(None)
        return DIFF.ddim_step(key, x0, xt, t, eta)

    # x_{t−1} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z with σ = eta·σ̃_t, z from the key.
    a, a_prev = float(DIFF.alphas_cumprod[3]), float(DIFF.alphas_cumprod[2])
    eps = (-0.2 - math.sqrt(a) * 0.3) / math.sqrt(1 - a)
    z = np.asarray(jax.random.normal(key, xt.shape))
    for eta in (0.0, 0.5, 1.0):
        var = eta**2 * float(DIFF.posterior_variance[3])
        expected = math.sqrt(a_prev) * 0.3 + math.sqrt(1 - a_prev - var) * eps + math.sqrt(var) * z
        np.testing.assert_allclose(step(eta), expected, atol=1e-5)
    assert len(traces) == 1  # one compile for every eta
    # A traced eta = 0 is the deterministic step; a traced eta > 0 has σ² = eta² σ̃².
    np.testing.assert_allclose(step(0.0), DIFF.ddim_step(None, x0, xt, t), atol=1e-5)
    var = 0.25 * float(DIFF.posterior_variance[3])
    assert float(jnp.var(step(0.5))) == pytest.approx(var, rel=5 * math.sqrt(2 / (N_MC - 1)))
    with pytest.raises(ValueError, match="PRNG key"):
        DIFF.ddim_step(None, x0, xt, t, jnp.float32(0.0))


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
    expected = -_normal_log_cdf(1.0 / sigma) / math.log(2.0)
    assert float(vlb[0]) == pytest.approx(expected, rel=1e-4)
    # ... and where it is far from 0: μ = 0.5 x_0, σ = 0.5, so −log Φ(1) nats per voxel.
    wide = learned.variational_bound(x0, xt, t, 0.5 * x0, jnp.full(SHAPE, math.log(0.25)))
    assert float(wide[0]) == pytest.approx(-_normal_log_cdf(1.0) / math.log(2.0), rel=1e-5)
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

    # Closed forms: √ᾱ_t x_0 + √(1 − ᾱ_t) ε, and (j + 1)/N at j = 0, 250, ..., 1000.
    a = np.asarray(DIFF.alphas_cumprod).reshape(5, 1, 1, 1)
    expected = np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * np.asarray(noise)
    for got in (as_argument(DIFF, x0, noise, t), as_constant(x0, noise, t)):
        np.testing.assert_allclose(got[0], expected, atol=1e-5)
        np.testing.assert_allclose(got[1], (np.arange(0, 1001, 250) + 1) / 1001, rtol=1e-6)


def test_bfloat16_inputs_are_computed_in_float32():
    # In bfloat16 ᾱ_0 = 0.9999 rounds to 1 and √(1 − ᾱ_0) to 0: the arithmetic must promote.
    x0 = _x0().astype(jnp.bfloat16)
    eps = jax.random.normal(jax.random.key(14), SHAPE, jnp.bfloat16)
    t = jnp.zeros((SHAPE[0],), jnp.int32)
    xt = DIFF.q_sample(x0, eps, t)
    assert xt.dtype == jnp.float32
    np.testing.assert_allclose(DIFF.predict_x0_from_epsilon(xt, eps, t), x0, atol=1e-4)
