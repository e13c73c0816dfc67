"""Sampling loops, allowed step counts and ensembles."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import imgx_diffusion as idf

from . import toy

NUM_CLASSES = 3
BETAS = idf.beta_schedule("linear", 1001)
BASE = idf.GaussianDiffusion.from_betas(BETAS)
DIFF = BASE.respace(5)
IMAGE = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
PATTERN = jax.random.normal(jax.random.key(1), (2, 4, 4, NUM_CLASSES))


def test_allowed_sampling_steps():
    assert idf.allowed_num_sampling_steps(DIFF) == [2, 3, 5]
    assert idf.allowed_num_sampling_steps(BASE) is None
    np.testing.assert_array_equal(idf.sampling_diffusion(BASE, 7).timestep_map[[0, -1]], [0, 1000])
    np.testing.assert_array_equal(idf.sampling_diffusion(DIFF, 3).timestep_map, [0, 500, 1000])
    assert idf.sampling_diffusion(DIFF, 5) is DIFF
    with pytest.raises(ValueError, match=r"Choose K in \[2, 3, 5\]"):
        idf.sampling_diffusion(DIFF, 4)
    with pytest.raises(ValueError, match="outside"):
        idf.sampling_diffusion(BASE, 1)


def test_every_step_returned_with_training_network_times():
    def model_fn(image, mask_input, t, key):
        assert key is None
        return t[:, None, None, None] * PATTERN

    logits = idf.sample(DIFF, model_fn, jax.random.key(2), IMAGE, num_classes=3, num_steps=3)
    assert logits.shape == (2, 4, 4, NUM_CLASSES, 3)
    # Steps run from the noisiest (base index 1000) to the least noisy (base index 0).
    for i, base_index in enumerate([1000, 500, 0]):
        np.testing.assert_allclose(logits[..., i], (base_index + 1) / 1001 * PATTERN, rtol=1e-6)


def test_self_conditioning_feeds_the_previous_prediction():
    weights = jax.random.normal(jax.random.key(3), (NUM_CLASSES, NUM_CLASSES))

    def model_fn(image, mask_input, t, key):
        assert mask_input.shape[-1] == 2 * NUM_CLASSES
        return mask_input[..., NUM_CLASSES:] @ weights + t[:, None, None, None]

    logits = idf.sample(
        DIFF, model_fn, jax.random.key(4), IMAGE, num_classes=3, self_conditioning=True
    )
    times = DIFF.model_time(jnp.arange(4, -1, -1))
    condition = jnp.zeros(PATTERN.shape)  # zeros at the first step
    for k in range(5):
        expected = condition @ weights + times[k]
        np.testing.assert_allclose(logits[..., k], expected, rtol=1e-5, atol=1e-6)
        condition = jax.nn.softmax(expected, axis=-1)  # in(x̂_0) = softmax for x0-models


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver_2m"])
def test_sampler_matches_a_loop_of_steps(sampler):
    eps_diff = idf.GaussianDiffusion.from_betas(BETAS, model_output="epsilon").respace(5)
    params = toy.init_params(jax.random.key(5), 1, NUM_CLASSES, NUM_CLASSES)

    def model_fn(image, mask_input, t, key):
        return toy.apply(params, image, mask_input, t)

    key = jax.random.key(6)
    eta = 0.5 if sampler == "ddim" else 0.0
    logits = idf.sample(
        eps_diff, model_fn, key, IMAGE, num_classes=NUM_CLASSES, sampler=sampler, eta=eta
    )
    key_start, key_loop = jax.random.split(key)
    step_keys = jax.random.split(key_loop, 5)
    x = jax.random.normal(key_start, PATTERN.shape)
    x0_previous = None
    for i, k in enumerate(range(4, -1, -1)):
        t = jnp.full((2,), k)
        pred = idf.read_model_output(
            eps_diff, model_fn(IMAGE, idf.mask_from_x(x), eps_diff.model_time(t), None), x, t
        )
        np.testing.assert_allclose(logits[..., i], pred.logits, rtol=1e-4, atol=1e-4)
        if sampler == "ddpm":
            x = eps_diff.ddpm_step(step_keys[i], pred.x0, x, t)
        elif sampler == "ddim":
            x = eps_diff.ddim_step(step_keys[i], pred.x0, x, t, eta)
        else:
            x = eps_diff.dpm_solver_2m_step(pred.x0, x, t, x0_previous)
        x0_previous = pred.x0


def test_learned_range_sampling_uses_the_model_variance():
    # The model's variance output u sets the noise of each ancestral step: the sample equals a
    # loop of ddpm_step with log_variance = learned_log_variance(u, t), and u = ±1 differ.
    learned = idf.GaussianDiffusion.from_betas(BETAS, variance="learned_range").respace(5)
    params = toy.init_params(jax.random.key(12), 1, NUM_CLASSES, NUM_CLASSES)
    key = jax.random.key(7)
    key_start, key_loop = jax.random.split(key)
    step_keys = jax.random.split(key_loop, 5)

    @jax.jit
    def sample(u):  # one compile for both values of u
        def model_fn(image, mask_input, t, key):
            logits = toy.apply(params, image, mask_input, t)
            return jnp.concatenate([logits, jnp.full_like(logits, u)], axis=-1)

        return idf.sample(learned, model_fn, key, IMAGE, num_classes=NUM_CLASSES)

    results = {}
    for u in (-1.0, 1.0):
        logits = sample(u)
        x = jax.random.normal(key_start, PATTERN.shape)
        for i, k in enumerate(range(4, -1, -1)):
            t = jnp.full((2,), k)
            step_logits = toy.apply(params, IMAGE, idf.mask_from_x(x), learned.model_time(t))
            np.testing.assert_allclose(logits[..., i], step_logits, rtol=1e-4, atol=1e-4)
            log_var = learned.learned_log_variance(jnp.full(PATTERN.shape, u), t)
            x = learned.ddpm_step(step_keys[i], idf.x0_from_logits(step_logits), x, t, log_var)
        results[u] = logits
    assert float(jnp.max(jnp.abs(results[1.0][..., 1:] - results[-1.0][..., 1:]))) > 1e-2


def test_ensemble_from_probabilities_closed_forms():
    probs = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, batch=1, C=2)
    ens = idf.ensemble_from_probabilities(probs)
    np.testing.assert_allclose(ens.probabilities, [[0.5, 0.5]])
    np.testing.assert_allclose(ens.entropy, [math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(ens.variance, [0.25])
    agree = idf.ensemble_from_probabilities(jnp.array([[[0.2, 0.8]], [[0.2, 0.8]]]))
    np.testing.assert_allclose(agree.variance, [0.0])
    np.testing.assert_array_equal(agree.label, [1])
    entropy = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    np.testing.assert_allclose(agree.entropy, [entropy], rtol=1e-6)
    regions = idf.ensemble_from_probabilities(jnp.array([[[0.9, 0.5]]]), overlapping=True)
    np.testing.assert_array_equal(regions.label, [2])
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) + math.log(2.0)
    np.testing.assert_allclose(regions.entropy, [expected], rtol=1e-6)


def test_sample_ensemble():
    params = toy.init_params(jax.random.key(8), 1, NUM_CLASSES, NUM_CLASSES)

    def model_fn(image, mask_input, t, key):
        return toy.apply(params, image, mask_input, t)

    ens = idf.sample_ensemble(
        DIFF, model_fn, jax.random.key(9), IMAGE, num_samples=3, num_classes=NUM_CLASSES
    )
    assert ens.probabilities.shape == PATTERN.shape and ens.label.shape == PATTERN.shape[:-1]
    np.testing.assert_allclose(ens.probabilities.sum(-1), 1.0, rtol=1e-5)
    assert float(ens.variance.max()) > 0.0  # the samples differ through the noise
    assert bool(jnp.all(ens.entropy >= 0)) and float(ens.entropy.max()) <= math.log(3) + 1e-6


def test_sampling_on_a_two_device_mesh_matches_one_device():
    params = toy.init_params(jax.random.key(10), 1, NUM_CLASSES, NUM_CLASSES)
    sample = jax.jit(
        lambda params, image, key: idf.sample(
            DIFF,
            lambda *args: toy.apply(params, *args[:3]),
            key,
            image,
            num_classes=NUM_CLASSES,
            sampler="ddpm",
        )
    )
    expected = sample(params, IMAGE, jax.random.key(11))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    image = jax.device_put(IMAGE, NamedSharding(mesh, P("data")))
    got = sample(params, image, jax.random.key(11))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
