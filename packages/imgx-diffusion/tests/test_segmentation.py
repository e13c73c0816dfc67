"""Segmentation encoding and reading network outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imgx_diffusion as idf

BETAS = idf.beta_schedule("linear", 1001)
LABEL = jnp.array([[[0, 1], [2, 3]]])  # (1, 2, 2)


def test_exclusive_encoding_round_trip():
    mask = idf.mask_from_label(LABEL, 4)
    np.testing.assert_array_equal(mask[0, 1, 0], [0, 0, 1, 0])
    x = idf.x_from_mask(mask)
    assert set(np.unique(x).tolist()) == {-1.0, 1.0}
    np.testing.assert_array_equal(idf.mask_from_x(x), mask)
    # The network input clips a noisy x into [0, 1].
    np.testing.assert_allclose(idf.mask_from_x(jnp.array([-3.0, 0.0, 0.5, 2.0])), [0, 0.5, 0.75, 1])
    # Logits from a one-hot x give back the one-hot (up to the 1e-5 floor).
    probs = idf.probabilities_from_logits(idf.logits_from_x(x))
    np.testing.assert_allclose(probs, mask, atol=1e-4)
    np.testing.assert_allclose(idf.x0_from_logits(idf.logits_from_x(x)), x, atol=2e-4)
    np.testing.assert_array_equal(idf.label_from_probabilities(probs), LABEL)


def test_overlapping_encoding_is_nested_regions():
    mask = idf.mask_from_label(LABEL, 3, overlapping=True)
    np.testing.assert_array_equal(mask[0, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(mask[0, 1, 0], [1, 1, 0])  # label 2: regions ≥1, ≥2
    np.testing.assert_array_equal(mask[0, 1, 1], [1, 1, 1])
    x = jnp.array([-1.0, 0.0, 0.6])
    logits = idf.logits_from_x(x, overlapping=True)
    np.testing.assert_allclose(jax.nn.sigmoid(logits), [1e-5, 0.5, 0.8], rtol=1e-4)
    np.testing.assert_allclose(idf.x0_from_logits(logits, overlapping=True), x, atol=1e-4)
    probs = idf.probabilities_from_logits(
        idf.logits_from_x(idf.x_from_mask(mask), overlapping=True), overlapping=True
    )
    np.testing.assert_array_equal(idf.label_from_probabilities(probs, overlapping=True), LABEL)


@pytest.mark.parametrize("model_output", ["x0", "epsilon", "v"])
def test_read_model_output_recovers_x0_under_each_parameterisation(model_output):
    diffusion = idf.GaussianDiffusion.from_betas(BETAS, model_output=model_output).respace(5)
    x0 = idf.x_from_mask(idf.mask_from_label(jnp.array([[0, 1, 2, 1]]), 3))  # (1, 4, 3)
    x0 = jnp.repeat(x0, 4, axis=0)
    t = jnp.arange(4)
    eps = jax.random.normal(jax.random.key(0), x0.shape)
    xt = diffusion.q_sample(x0, eps, t)
    output = {
        "x0": 30.0 * x0,  # confident logits
        "epsilon": eps,
        "v": diffusion.predict_v(x0, eps, t),
    }[model_output]
    pred = idf.read_model_output(diffusion, output, xt, t)
    np.testing.assert_allclose(pred.x0, x0, atol=2e-4)
    np.testing.assert_allclose(pred.estimate, diffusion.training_target(x0, xt, t), atol=2e-4)
    np.testing.assert_array_equal(jnp.argmax(pred.logits, -1), jnp.argmax(x0, -1))
    assert pred.log_variance is None


def test_read_model_output_learned_range_and_shape_errors():
    diffusion = idf.GaussianDiffusion.from_betas(BETAS, variance="learned_range").respace(5)
    xt = jnp.zeros((2, 4, 3))
    t = jnp.array([1, 3])
    output = jnp.concatenate([jnp.zeros((2, 4, 3)), jnp.ones((2, 4, 3))], axis=-1)
    pred = idf.read_model_output(diffusion, output, xt, t)
    np.testing.assert_allclose(pred.log_variance[:, 0, 0], np.log(diffusion.betas[[1, 3]]), 1e-5)
    with pytest.raises(ValueError, match="2C output channels"):
        idf.read_model_output(diffusion, jnp.zeros((2, 4, 3)), xt, t)
