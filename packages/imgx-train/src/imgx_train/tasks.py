"""Tasks: what a step computes for supervised (`seg`) and diffusion segmentation.

A `Task` builds the network for a dataset, gives the per-sample training loss (with the
timestep-sampler state as auxiliary state for diffusion) and the prediction function used
by validation, test and predict. The trainer and the evaluator only talk to this interface.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import imgx_data
import imgx_diffusion as idf
import imgx_nets
from imgx_train import config as config_lib
from imgx_train import devices


def augmentation_config(
    cfg: config_lib.Config, info: imgx_data.DatasetInfo
) -> imgx_data.AugmentationConfig:
    """The on-device augmentation of the train step (with `data.augmentation` off: only
    the patch crop and the min-max rescaling that evaluation applies too).

    Raises:
      ConfigError: `data.shift` with a number of values other than 1 or the dataset's
        spatial axes.
    """
    d = cfg.data
    on = d.augmentation
    if isinstance(d.shift, tuple) and len(d.shift) != info.num_spatial_dims:
        raise config_lib.ConfigError(
            f"data.shift={list(d.shift)} has {len(d.shift)} values but {info.name} has "
            f"{info.num_spatial_dims} spatial axes: give one value for all axes or one per axis"
        )
    return imgx_data.AugmentationConfig(
        rotation_degrees=d.rotation if on else 0.0,
        zoom=d.zoom if on else 0.0,
        shear_degrees=d.shear if on else 0.0,
        shift=d.shift if on else 0.0,
        shift_unit=d.shift_unit,
        keep_foreground_in_view=on and d.keep_foreground_in_view,
        gamma=d.gamma if on else 0.0,
        probability=d.probability,
        flip_axes=tuple(range(info.num_spatial_dims)) if (on and d.flip) else (),
        rescale=True,
        patch_shape=d.patch_shape,
        foreground_fraction=d.foreground_oversampling,
    )


class Task:
    """The network, loss and prediction of one run (seg or diffusion)."""

    def __init__(self, cfg: config_lib.Config, info: imgx_data.DatasetInfo):
        self.cfg = cfg
        self.info = info
        self.is_diffusion = cfg.train.task == "diffusion"
        self.overlapping = bool(info.overlapping)
        # Overlapping regions (BraTS) have one sigmoid channel per region, no background.
        self.num_channels = info.num_classes - 1 if self.overlapping else info.num_classes
        self.loss_weights = idf.SegmentationLossWeights(
            dice=cfg.loss.dice,
            cross_entropy=cfg.loss.cross_entropy,
            focal=cfg.loss.focal,
            focal_gamma=cfg.loss.focal_gamma,
        )
        d = cfg.diffusion
        self.self_conditioning = d.strategy in idf.SELF_CONDITIONING_STRATEGIES
        if self.is_diffusion:
            base = idf.GaussianDiffusion.from_betas(
                idf.beta_schedule(
                    d.beta_schedule,
                    num_timesteps=d.num_timesteps,
                    beta_start=d.beta_start,
                    beta_end=d.beta_end,
                ),
                model_output=d.model_output,
                variance=d.variance,
            )
            self.diffusion = (
                base.respace(d.num_train_steps) if d.num_train_steps != d.num_timesteps else base
            )
            self.timestep_sampler = idf.TimestepSampler(method=d.timestep_sampler)
        self.graphdef, _ = nnx.split(self._network(jax.random.key(0)))

    # -- network -------------------------------------------------------------------
    def _network(self, key: jax.Array) -> nnx.Module:
        m = self.cfg.model
        mask_channels = 0
        out_channels = self.num_channels
        if self.is_diffusion:
            mask_channels = self.num_channels * (2 if self.self_conditioning else 1)
            if self.cfg.diffusion.variance == "learned_range":
                out_channels *= 2
        remat = m.remat if m.remat is not None else jax.default_backend() != "cpu"
        return imgx_nets.UNet(
            num_spatial_dims=self.info.num_spatial_dims,
            in_channels=self.info.num_channels,
            out_channels=out_channels,
            num_channels=m.num_channels,
            num_res_blocks=m.num_res_blocks,
            kernel_size=m.kernel_size,
            patch_size=m.patch_size,
            scale_factor=m.scale_factor,
            num_heads=m.num_heads,
            widening_factor=m.widening_factor,
            num_transformer_layers=m.num_transformer_layers,
            dropout=m.dropout,
            skip=m.skip,
            decoder=m.decoder,
            remat=remat,
            mask_channels=mask_channels,
            time_conditioned=self.is_diffusion,
            dtype=devices.compute_dtype(m.dtype),
            rngs=nnx.Rngs(params=key),
        )

    def init_params(self, key: jax.Array) -> nnx.State:
        _, params = nnx.split(self._network(key))
        return params

    def model_fn(self, params: nnx.State) -> imgx_nets.ModelFn:
        return imgx_nets.as_model_fn(self.graphdef, params)

    # -- training ------------------------------------------------------------------
    def init_aux(self) -> Any:
        """Timestep-sampler history for diffusion, nothing for seg."""
        if not self.is_diffusion:
            return {}
        return self.timestep_sampler.init(self.diffusion.num_timesteps)

    def loss(self, params, key, image, label, aux):
        """Mean weighted loss and (per-sample L_t, t, logged terms).

        For diffusion L_t is the unweighted loss of the final pass at the sampled step t
        (segmentation + MSE + VLB by weight); it feeds the importance sampler's history of
        step t. The auxiliary first-pass term is trained but not part of L_t: that pass
        runs at another step (t + 1 or T − 1). For seg L_t is the per-sample loss.
        """
        model_fn = self.model_fn(params)
        if not self.is_diffusion:
            logits = model_fn(image, None, None, key)
            total, terms = idf.segmentation_loss(
                logits, label, weights=self.loss_weights, overlapping=self.overlapping
            )
            t = jnp.zeros(label.shape[:1], jnp.int32)
            return total.mean(), (total, t, {k: v.mean() for k, v in terms.items()})
        cfg = self.cfg
        out = idf.apply_strategy(
            cfg.diffusion.strategy,
            self.diffusion,
            model_fn,
            key,
            image,
            label,
            aux,
            num_classes=self.num_channels,
            overlapping=self.overlapping,
            timestep_sampler=self.timestep_sampler,
            recycle_with_posterior_mean=cfg.diffusion.recycle_posterior_mean,
            recycle_next_clipped=cfg.diffusion.recycle_next_clipped,
            self_conditioning_probability=cfg.diffusion.self_cond_probability,
            compute_vlb=cfg.loss.vlb > 0,
        )
        loss_t, terms = idf.segmentation_loss(
            out.logits, label, weights=self.loss_weights, overlapping=self.overlapping
        )
        if cfg.loss.mse > 0:
            mse = self.mse_loss(out)
            loss_t = loss_t + cfg.loss.mse * mse
            terms["mse"] = mse
        if cfg.loss.vlb > 0:
            loss_t = loss_t + cfg.loss.vlb * out.vlb
            terms["vlb"] = out.vlb
        total = loss_t
        if cfg.loss.aux > 0 and out.first_pass_logits is not None:
            aux_total, _ = idf.segmentation_loss(
                out.first_pass_logits,
                label,
                weights=self.loss_weights,
                overlapping=self.overlapping,
            )
            total = total + cfg.loss.aux * aux_total
            terms["aux"] = aux_total
        weighted = (out.weight * total).mean()
        return weighted, (loss_t, out.t, {k: v.mean() for k, v in terms.items()})

    def mse_loss(self, out: idf.StrategyOutput) -> jax.Array:
        """Per-sample MSE of the final pass (batch,), as `loss.mse_target` asks.

        `output`: the strategy's MSE of the estimate vs the target of the parameterisation.
        `epsilon`: mean (ε̂ − ε)² with ε = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t) for the true x_0 (the
        noise that made x_t from x_0; for recycling strategies x_t came from the recycled
        estimate, and ε is still the noise relative to the ground truth, as in
        `GaussianDiffusion.training_target`). ε̂: the network output for `epsilon`; from
        x̂_0 by the same formula for `x0` (so the term is ᾱ_t/(1 − ᾱ_t)·mean (x̂_0 − x_0)²);
        √(1 − ᾱ_t) x_t + √ᾱ_t v̂ for `v` (so the term is ᾱ_t · mean (v̂ − v)²).
        """
        model_output = self.cfg.diffusion.model_output
        if self.cfg.loss.mse_target == "output" or model_output == "epsilon":
            return out.mse
        if model_output == "v":
            alphas_cumprod = jnp.asarray(self.diffusion.alphas_cumprod, out.mse.dtype)
            return alphas_cumprod[out.t] * out.mse
        x0_pred = idf.x0_from_logits(out.logits, overlapping=self.overlapping)
        eps_pred = self.diffusion.predict_epsilon_from_x0(out.xt, x0_pred, out.t)
        eps = self.diffusion.predict_epsilon_from_x0(out.xt, out.x0, out.t)
        return jnp.mean(jnp.square(eps_pred - eps).reshape(eps.shape[0], -1), axis=1)

    def update_aux(self, aux, t, per_sample_loss):
        if not self.is_diffusion:
            return aux
        return self.timestep_sampler.update(aux, t, per_sample_loss)

    # -- prediction ----------------------------------------------------------------
    def check_sampling(self, sampler: str, num_steps: int) -> None:
        """Raises a clear error for a sampler or K the trained model does not allow."""
        if self.is_diffusion:
            if sampler not in idf.SAMPLERS:
                raise config_lib.ConfigError(
                    f"sampler {sampler!r} is not one of {', '.join(idf.SAMPLERS)}"
                )
            try:
                idf.sampling_diffusion(self.diffusion, num_steps)
            except ValueError as e:  # K not allowed by the trained T: a user choice
                raise config_lib.ConfigError(str(e)) from e

    def predict_fn(self, sampler: str, num_steps: int, eta: float = 0.0):
        """`f(params, key, image) -> probabilities (batch, *spatial, C, K)`, jitted.

        K = 1 for seg; for diffusion the probabilities of x̂_0 at every sampling step.
        Images are min-max rescaled per sample as in training.
        """
        self.check_sampling(sampler, num_steps)

        @jax.jit
        def predict(params, key, image):
            image = jax.vmap(imgx_data.min_max_rescale)(image)
            model_fn = self.model_fn(params)
            if not self.is_diffusion:
                logits = model_fn(image, None, None, None)[..., None]
            else:
                logits = idf.sample(
                    self.diffusion,
                    model_fn,
                    key,
                    image,
                    num_classes=self.num_channels,
                    num_steps=num_steps,
                    sampler=sampler,
                    eta=eta,
                    self_conditioning=self.self_conditioning,
                    overlapping=self.overlapping,
                )
            return idf.probabilities_from_logits(
                jnp.moveaxis(logits, -1, 0), overlapping=self.overlapping
            ).transpose(*range(1, logits.ndim), 0)

        return predict

    def labels_from_probabilities(self, probabilities):
        """Integer labels from probabilities (..., C) (argmax, or nested regions)."""
        return idf.label_from_probabilities(probabilities, overlapping=self.overlapping)

    @functools.cached_property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)


def init_state(cfg: config_lib.Config, task: Task, tx) -> dict[str, Any]:
    """The train state pytree: step, key, params, optimizer state, task state, EMA."""
    init_key, step_key = jax.random.split(jax.random.key(cfg.train.seed))
    params = task.init_params(init_key)
    state = {
        "step": jnp.asarray(0, jnp.int32),
        "key": step_key,
        "params": params,
        "opt_state": tx.init(params),
        "aux": task.init_aux(),
    }
    if cfg.optimizer.ema_decay is not None:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state
