"""Training strategies: one loss step each, as pure functions returning per-sample values.

Notation: f the network, in(x) = (clip(x, −1, 1) + 1)/2, pred(out) the x̂_0 read from an
output, q(x_0, ε, t) the forward sample, sg the stop-gradient.

| name             | t range   | first pass (no gradient into x_t)   | final pass input        |
|------------------|-----------|-------------------------------------|-------------------------|
| `standard`       | [0, T)    | —                                   | in(q(x_0, ε, t)) at t   |
| `recycle_next`   | [0, T−1)  | f(in(q(x_0, ε', t+1))) at t+1       | in(q(sg x̂_0, ε, t)) at t† |
| `recycle_last`   | [0, T−1)  | f(in(q(x_0, ε', T−1))) at T−1       | in(q(sg x̂_0, ε, t)) at t |
| `self_cond_same` | [0, T)    | f([in(x_t), 0]) at t                | [in(x_t), c] at t       |
| `self_cond_next` | [0, T−1)  | f([in(x_{t+1}), 0]) at t+1          | [in(x_t), c] at t (*)   |

(*) x_t = posterior mean(sg x̂_0, x_{t+1}), one reverse step from x_{t+1}.
(†) options: x_t = posterior mean(sg x̂_0, x_{t+1}) (``recycle_with_posterior_mean``), or
t from [0, T) with the first pass at min(t + 1, T − 1) (``recycle_next_clipped``, the
DGM4MICCAI 2023 code, which also trains t = T − 1).
c = sg(in(x̂_0 of the first pass)) with probability p per sample (default 1/2), else 0.
xt-recycling: Fu et al. arXiv 2303.06040; xT-recycling: Fu et al. arXiv 2308.16355;
self-conditioning: Chen et al. 2022 ("same"), Watson et al. 2023 ("next").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from imgx_diffusion.gaussian_diffusion import GaussianDiffusion, compute_dtype
from imgx_diffusion.segmentation import (
    ModelPrediction,
    mask_from_label,
    mask_from_x,
    read_model_output,
    x_from_mask,
)
from imgx_diffusion.timestep_sampler import TimestepSampler, TimestepSamplerState

ModelFn = Callable[[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None], jax.Array]

STRATEGIES = ("standard", "recycle_next", "recycle_last", "self_cond_same", "self_cond_next")
SELF_CONDITIONING_STRATEGIES = ("self_cond_same", "self_cond_next")


class StrategyOutput(NamedTuple):
    """Per-sample results of one training strategy step.

    Attributes:
        logits: class logits of the final pass (batch, *spatial, C); add segmentation losses.
        x0: ground-truth encoding x_0 = 2·mask − 1 (batch, *spatial, C).
        xt: noisy x of the final pass (batch, *spatial, C).
        t: sampled step indices of the final pass, int32 (batch,).
        weight: importance weights 1/(n·p_t) (batch,); multiply per-sample losses by them.
        mse: mean squared error of the network's estimate vs its target (x_0, ε or v
            according to the parameterisation), (batch,).
        vlb: variational bound term in bits/dim (batch,) when requested, else None.
        first_pass_logits: logits of the first pass (with gradient) for two-pass
            strategies, for an optional auxiliary loss; None for ``standard``.
    """

    logits: jax.Array
    x0: jax.Array
    xt: jax.Array
    t: jax.Array
    weight: jax.Array
    mse: jax.Array
    vlb: jax.Array | None
    first_pass_logits: jax.Array | None


def _per_sample_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def model_input(xt: chex.Array, self_conditioning: chex.Array | None = None) -> jax.Array:
    """Mask input of the network: in(x_t), or [in(x_t), condition] on the channel axis."""
    mask = mask_from_x(xt)
    if self_conditioning is None:
        return mask
    return jnp.concatenate([mask, self_conditioning], axis=-1)


def apply_strategy(
    strategy: str,
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    key: chex.PRNGKey,
    image: chex.Array,
    label: chex.Array,
    sampler_state: TimestepSamplerState,
    *,
    num_classes: int,
    overlapping: bool = False,
    timestep_sampler: TimestepSampler = TimestepSampler(),  # noqa: B008 (frozen, immutable)
    recycle_with_posterior_mean: bool = False,
    recycle_next_clipped: bool = False,
    self_conditioning_probability: float = 0.5,
    compute_vlb: bool = False,
) -> StrategyOutput:
    """Run one training strategy: sample t and noise, call the network once or twice.

    The caller adds segmentation losses on ``logits`` (``losses.segmentation_loss``),
    multiplies the per-sample total by ``weight``, and updates the sampler state with the
    unweighted per-sample losses: ``timestep_sampler.update(state, out.t, loss)``.

    Args:
        strategy: one of ``standard``, ``recycle_next``, ``recycle_last``, ``self_cond_same``,
            ``self_cond_next``.
        diffusion: the training process (T steps, usually respaced from the base schedule).
        model_fn: ``f(image, mask_input, t, key) -> output``; mask_input has C channels
            (2C for self-conditioning), t is the network time (batch,), output C channels
            (2C for ``learned_range``); key feeds dropout (each pass gets its own).
        key: PRNG key.
        image: (batch, *spatial, channels).
        label: integer labels (batch, *spatial).
        sampler_state: history of the timestep sampler.
        num_classes: C, classes (exclusive, with background) or regions (overlapping).
        overlapping: sigmoid regions instead of softmax classes.
        timestep_sampler: how t is drawn (importance sampling by default).
        recycle_with_posterior_mean: ``recycle_next`` only: x_t is the posterior mean
            q(x_t | x_{t+1}, x̂_0) instead of a fresh q(x̂_0, ε, t).
        recycle_next_clipped: ``recycle_next`` only: t from [0, T) instead of [0, T − 1),
            the first pass at min(t + 1, T − 1) (Fu et al. arXiv 2303.06040, their code), so
            t = T − 1 is trained too (its first pass runs at the same step).
        self_conditioning_probability: probability per sample that the second pass of a
            self-conditioning strategy is conditioned on the first pass (else on 0);
            Chen et al. 2022 use 1/2.
        compute_vlb: also return the variational bound term (required by ``learned_range``).

    Returns:
        StrategyOutput.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"diffusion strategy: unknown {strategy!r}; choose one of {STRATEGIES} "
            "(recycling and self-conditioning cannot be combined)."
        )
    if recycle_with_posterior_mean and strategy != "recycle_next":
        raise ValueError(
            "recycle_with_posterior_mean applies to strategy 'recycle_next' only, "
            f"got {strategy!r}."
        )
    if recycle_next_clipped and strategy != "recycle_next":
        raise ValueError(
            f"recycle_next_clipped applies to strategy 'recycle_next' only, got {strategy!r}."
        )
    if recycle_next_clipped and recycle_with_posterior_mean:
        raise ValueError(
            "recycle_next_clipped and recycle_with_posterior_mean cannot be combined: at "
            "t = T − 1 the first pass runs at t itself, and one reverse step from it is not x_t."
        )
    if not 0.0 <= self_conditioning_probability <= 1.0:
        raise ValueError(
            "self_conditioning_probability must lie in [0, 1], "
            f"got {self_conditioning_probability}."
        )
    if diffusion.variance == "learned_range" and not compute_vlb:
        raise ValueError(
            "variance 'learned_range' is trained only by the variational bound: "
            "set compute_vlb=True and give the VLB loss a positive weight."
        )
    chex.assert_rank(image, label.ndim + 1)
    chex.assert_equal_shape_prefix([image, label], label.ndim)

    num_timesteps = diffusion.num_timesteps
    batch_size = label.shape[0]
    k_t, k_noise_first, k_noise, k_model_first, k_model, k_cond = jax.random.split(key, 6)
    dtype = compute_dtype(image.dtype)
    mask = mask_from_label(label, num_classes, overlapping=overlapping, dtype=dtype)
    x0 = x_from_mask(mask)

    def call(xt: jax.Array, mask_input: jax.Array, t: jax.Array, k) -> ModelPrediction:
        output = model_fn(image, mask_input, diffusion.model_time(t), k)
        return read_model_output(diffusion, output, xt, t, overlapping=overlapping)

    def noisy(x: jax.Array, t: jax.Array, k) -> jax.Array:
        return diffusion.q_sample(x, jax.random.normal(k, x.shape, x.dtype), t)

    def self_condition(first: ModelPrediction) -> jax.Array:
        keep = jax.random.bernoulli(k_cond, self_conditioning_probability, (batch_size,))
        keep = keep.reshape((batch_size,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
        return jax.lax.stop_gradient(mask_from_x(first.x0)) * keep

    single_pass = strategy in ("standard", "self_cond_same")
    t_max = num_timesteps if single_pass or recycle_next_clipped else num_timesteps - 1
    t, weight = timestep_sampler.sample(k_t, sampler_state, batch_size, 0, t_max)

    first = None
    if strategy == "standard":
        xt = noisy(x0, t, k_noise)
        final = call(xt, model_input(xt), t, k_model)
    elif strategy in ("recycle_next", "recycle_last"):
        if strategy == "recycle_next":
            t_first = jnp.minimum(t + 1, num_timesteps - 1)
        else:
            t_first = jnp.full_like(t, num_timesteps - 1)
        x_first = noisy(x0, t_first, k_noise_first)
        first = call(x_first, model_input(x_first), t_first, k_model_first)
        x0_recycled = jax.lax.stop_gradient(first.x0)
        if recycle_with_posterior_mean:
            xt, _, _ = diffusion.q_posterior_mean_variance(x0_recycled, x_first, t_first)
        else:
            xt = noisy(x0_recycled, t, k_noise)
        final = call(xt, model_input(xt), t, k_model)
    elif strategy == "self_cond_same":
        xt = noisy(x0, t, k_noise)
        first = call(xt, model_input(xt, jnp.zeros_like(x0)), t, k_model_first)
        final = call(xt, model_input(xt, self_condition(first)), t, k_model)
    else:  # self_cond_next
        x_next = noisy(x0, t + 1, k_noise_first)
        first = call(x_next, model_input(x_next, jnp.zeros_like(x0)), t + 1, k_model_first)
        # The second pass sees x_t, one reverse step from x_{t+1} (not x_{t+1} itself).
        xt, _, _ = diffusion.q_posterior_mean_variance(
            jax.lax.stop_gradient(first.x0), x_next, t + 1
        )
        final = call(xt, model_input(xt, self_condition(first)), t, k_model)

    target = diffusion.training_target(x0, xt, t)
    mse = _per_sample_mean(jnp.square(final.estimate - target))
    vlb = None
    if compute_vlb:
        vlb = diffusion.variational_bound(x0, xt, t, final.x0, final.log_variance)
    return StrategyOutput(
        logits=final.logits,
        x0=x0,
        xt=xt,
        t=t,
        weight=weight,
        mse=mse,
        vlb=vlb,
        first_pass_logits=None if first is None else first.logits,
    )
