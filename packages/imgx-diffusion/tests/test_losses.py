"""Segmentation losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imgx_diffusion as idf


def _logits_from_probs(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


def test_dice_hand_value_over_present_foreground():
    # 1 sample, 2 voxels, 3 classes; class 2 absent from the ground truth.
    probs = [[[0.2, 0.8, 0.0001], [0.6, 0.3, 0.1]]]
    label = jnp.array([[1, 0]])
    p = np.array(probs)[0] / np.array(probs)[0].sum(-1, keepdims=True)
    dice_1 = 2 * p[0, 1] / (p[:, 1].sum() + 1)
    got = idf.dice_loss(_logits_from_probs(probs), label)
    assert float(got[0]) == pytest.approx(1 - dice_1, rel=1e-5)


def test_dice_is_zero_for_perfect_and_for_no_foreground_never_nan():
    label = jnp.array([[0, 1, 2, 2], [0, 0, 0, 0]])
    logits = 50.0 * jax.nn.one_hot(label, 3)
    got = idf.dice_loss(logits, label)
    np.testing.assert_allclose(got, [0.0, 0.0], atol=1e-6)
    grad = jax.grad(lambda z: idf.dice_loss(z, label).sum())(jnp.zeros((2, 4, 3)))
    assert bool(jnp.all(jnp.isfinite(grad)))
    # A sample without foreground contributes 0 and no gradient.
    assert float(jnp.abs(grad[1]).max()) == 0.0


def test_cross_entropy_and_focal_hand_values():
    probs = [[[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]]
    label = jnp.array([[0, 1]])
    logits = _logits_from_probs(probs)
    ce = -(math.log(0.7) + math.log(0.25)) / 2
    focal = -((0.3**2) * math.log(0.7) + (0.75**2) * math.log(0.25)) / 2
    assert float(idf.cross_entropy_loss(logits, label)[0]) == pytest.approx(ce, rel=1e-5)
    assert float(idf.focal_loss(logits, label)[0]) == pytest.approx(focal, rel=1e-5)
    assert float(idf.focal_loss(logits, label, gamma=0.0)[0]) == pytest.approx(ce, rel=1e-5)


def test_overlapping_losses_use_sigmoid_regions():
    label = jnp.array([[0, 2]])  # regions: ≥1, ≥2
    probs = np.array([[[0.1, 0.2], [0.9, 0.6]]])
    logits = jnp.log(probs) - jnp.log1p(-probs)
    y = np.array([[0, 0], [1, 1]])
    p_true = np.where(y == 1, probs[0], 1 - probs[0])
    ce = -np.log(p_true).mean()
    focal = -(((1 - p_true) ** 2) * np.log(p_true)).mean()
    dice = np.mean([2 * probs[0, 1, c] / (probs[0, :, c].sum() + 1) for c in range(2)])
    kwargs = {"overlapping": True}
    assert float(idf.cross_entropy_loss(logits, label, **kwargs)[0]) == pytest.approx(ce, 1e-5)
    assert float(idf.focal_loss(logits, label, **kwargs)[0]) == pytest.approx(focal, 1e-5)
    assert float(idf.dice_loss(logits, label, **kwargs)[0]) == pytest.approx(1 - dice, 1e-5)


def test_segmentation_loss_weights():
    label = jnp.array([[0, 1, 2]])
    logits = jax.random.normal(jax.random.key(0), (1, 3, 3))
    weights = idf.SegmentationLossWeights(dice=2.0, cross_entropy=0.5, focal=3.0)
    total, terms = idf.segmentation_loss(logits, label, weights=weights)
    expected = 2 * terms["dice"] + 0.5 * terms["cross_entropy"] + 3 * terms["focal"]
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert total.shape == (1,)
