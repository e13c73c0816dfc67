"""Sampling segmentations (DDPM, DDIM, DPM-Solver++(2M)) and ensembles with uncertainty."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from imgx_diffusion.gaussian_diffusion import GaussianDiffusion, compute_dtype
from imgx_diffusion.segmentation import (
    label_from_probabilities,
    mask_from_x,
    probabilities_from_logits,
    read_model_output,
)
from imgx_diffusion.strategies import ModelFn, model_input

SAMPLERS = ("ddpm", "ddim", "dpm_solver_2m")


def allowed_num_sampling_steps(diffusion: GaussianDiffusion) -> list[int] | None:
    """Numbers of sampling steps K whose noise levels the training process contains.

    None means any K in [2, T]: the process uses every step of its base schedule. Otherwise
    K ≥ 2 with (T − 1) divisible by (K − 1), e.g. T = 5 → [2, 3, 5].
    """
    t = diffusion.num_timesteps
    if t == diffusion.num_base_timesteps:
        return None
    return [k for k in range(2, t + 1) if (t - 1) % (k - 1) == 0]


def sampling_diffusion(diffusion: GaussianDiffusion, num_steps: int) -> GaussianDiffusion:
    """The K-step process to sample a model trained on ``diffusion`` (T steps).

    Raises a ValueError naming the allowed K when the K evenly spaced steps are not among
    the noise levels the model was trained on (spec §1). Call outside jit.
    """
    allowed = allowed_num_sampling_steps(diffusion)
    t = diffusion.num_timesteps
    if allowed is None:
        if not 2 <= num_steps <= t:
            raise ValueError(
                f"sampling steps: K = {num_steps} is outside [2, {t}] for a model trained on "
                f"all {t} steps."
            )
    elif num_steps not in allowed:
        raise ValueError(
            f"sampling steps: K = {num_steps} is not allowed for a model trained with T = {t} "
            f"steps respaced from N = {diffusion.num_base_timesteps}: K − 1 must divide "
            f"T − 1 = {t - 1}, so that every sampling step is a trained noise level. "
            f"Choose K in {allowed}."
        )
    return diffusion if num_steps == t else diffusion.respace(num_steps)


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    key: chex.PRNGKey,
    image: chex.Array,
    *,
    num_classes: int,
    num_steps: int | None = None,
    sampler: str = "ddpm",
    eta: float | chex.Array = 0.0,
    self_conditioning: bool = False,
    overlapping: bool = False,
) -> jax.Array:
    """Sample segmentations from noise; the x̂_0 logits of every step.

    Starts at x_{K−1} ~ N(0, I) of shape (batch, *spatial, C) and runs k = K−1 … 0 in one
    ``lax.scan``; the network is called with key None (evaluation) and time
    ``diffusion.model_time(k)``. Self-conditioning feeds the previous step's in(x̂_0)
    (zeros at the first step).

    Args:
        diffusion: the training process; respaced to ``num_steps`` if given (checked with
            ``sampling_diffusion``, outside jit), else sampled with its own T steps.
        model_fn: ``f(image, mask_input, t, key) -> output`` as in training.
        key: PRNG key.
        image: (batch, *spatial, channels).
        num_classes: C.
        num_steps: K, sampling steps.
        sampler: ``ddpm`` (ancestral), ``ddim`` (with ``eta``) or ``dpm_solver_2m``.
        eta: DDIM noise scale (0 deterministic, 1 DDPM-like); a Python float or a scalar
            array, which may be traced (e.g. a jit argument: one compile for every eta).
        self_conditioning: the model was trained with a self-conditioning strategy.
        overlapping: sigmoid regions instead of softmax classes.

    Returns:
        logits (batch, *spatial, C, K); [..., −1] is the final prediction.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown {sampler!r}; choose one of {SAMPLERS}.")
    if num_steps is not None:
        diffusion = sampling_diffusion(diffusion, num_steps)
    num_steps = diffusion.num_timesteps
    shape = image.shape[:-1] + (num_classes,)
    key_start, key_loop = jax.random.split(key)

    def step(carry, xs):
        # carry: x, plus the previous in(x̂_0) for self-conditioning and the previous x̂_0
        # for DPM-Solver++(2M), each only when used (a carry cannot be dead-code eliminated).
        x = carry["x"]
        k, step_key = xs
        t = jnp.full((shape[0],), k, jnp.int32)
        mask_input = model_input(x, carry.get("condition"))
        output = model_fn(image, mask_input, diffusion.model_time(t), None)
        pred = read_model_output(diffusion, output, x, t, overlapping=overlapping)
        if sampler == "ddpm":
            x_prev = diffusion.ddpm_step(step_key, pred.x0, x, t, pred.log_variance)
        elif sampler == "ddim":
            x_prev = diffusion.ddim_step(step_key, pred.x0, x, t, eta)
        else:
            x_prev = diffusion.dpm_solver_2m_step(pred.x0, x, t, carry["x0_previous"])
        new_carry = {"x": x_prev}
        if self_conditioning:
            new_carry["condition"] = mask_from_x(pred.x0)
        if sampler == "dpm_solver_2m":
            new_carry["x0_previous"] = pred.x0
        return new_carry, pred.logits

    dtype = compute_dtype(image.dtype)
    carry = {"x": jax.random.normal(key_start, shape, dtype)}
    if self_conditioning:
        carry["condition"] = jnp.zeros(shape, dtype)
    if sampler == "dpm_solver_2m":
        carry["x0_previous"] = jnp.zeros(shape, dtype)
    steps = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    step_keys = jax.random.split(key_loop, num_steps)
    _, logits = jax.lax.scan(step, carry, (steps, step_keys))
    return jnp.moveaxis(logits, 0, -1)


class Ensemble(NamedTuple):
    """Summary of S sampled segmentations.

    Attributes:
        probabilities: mean class probabilities over samples (batch, *spatial, C).
        label: predicted label (batch, *spatial), see ``label_from_probabilities``.
        entropy: predictive entropy of the mean probabilities, nats (batch, *spatial);
            for overlapping regions the sum of the per-region binary entropies.
        variance: variance across samples of each class probability, averaged over
            classes (batch, *spatial).
    """

    probabilities: jax.Array
    label: jax.Array
    entropy: jax.Array
    variance: jax.Array


def ensemble_from_probabilities(
    probabilities: chex.Array, *, overlapping: bool = False
) -> Ensemble:
    """Mean, label and uncertainty maps from per-sample probabilities (S, batch, *spatial, C)."""
    mean = jnp.mean(probabilities, axis=0)
    variance = jnp.mean(jnp.var(probabilities, axis=0), axis=-1)

    def plogp(p):
        return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)

    if overlapping:
        entropy = -jnp.sum(plogp(mean) + plogp(1.0 - mean), axis=-1)
    else:
        entropy = -jnp.sum(plogp(mean), axis=-1)
    label = label_from_probabilities(mean, overlapping=overlapping)
    return Ensemble(probabilities=mean, label=label, entropy=entropy, variance=variance)


def sample_ensemble(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    key: chex.PRNGKey,
    image: chex.Array,
    *,
    num_samples: int,
    num_classes: int,
    num_steps: int | None = None,
    sampler: str = "ddpm",
    eta: float | chex.Array = 0.0,
    self_conditioning: bool = False,
    overlapping: bool = False,
) -> Ensemble:
    """S independent samples (one key each, run one after another to bound memory),
    summarised by ``ensemble_from_probabilities`` on the final step's probabilities."""
    if num_samples < 1:
        raise ValueError(f"sample_ensemble: num_samples must be ≥ 1, got {num_samples}.")
    if num_steps is not None:
        diffusion = sampling_diffusion(diffusion, num_steps)

    def one(sample_key):
        logits = sample(
            diffusion,
            model_fn,
            sample_key,
            image,
            num_classes=num_classes,
            sampler=sampler,
            eta=eta,
            self_conditioning=self_conditioning,
            overlapping=overlapping,
        )
        return probabilities_from_logits(logits[..., -1], overlapping=overlapping)

    probabilities = jax.lax.map(one, jax.random.split(key, num_samples))
    return ensemble_from_probabilities(probabilities, overlapping=overlapping)
