"""A standalone user's loop: train a toy network with recycling, then sample it."""

import jax
import jax.numpy as jnp

import imgx_diffusion as idf

from . import toy

NUM_CLASSES = 3


def test_train_with_recycle_last_then_sample():
    diffusion = idf.GaussianDiffusion.from_betas(idf.beta_schedule("linear", 1001)).respace(5)
    timestep_sampler = idf.TimestepSampler("importance")
    label = jax.random.randint(jax.random.key(0), (8, 4, 4), 0, NUM_CLASSES)
    # The image shows the classes through noise: a per-voxel linear model can segment it.
    noise = 0.3 * jax.random.normal(jax.random.key(1), label.shape + (NUM_CLASSES,))
    image = jax.nn.one_hot(label, NUM_CLASSES) + noise
    params = toy.init_params(jax.random.key(2), NUM_CLASSES, NUM_CLASSES, NUM_CLASSES)

    def network(params, image, mask_input, t, key):
        return toy.apply(params, image, mask_input, t)

    @jax.jit
    def train_step(params, state, key):
        def loss_fn(params):
            out = idf.apply_strategy(
                "recycle_last",
                diffusion,
                lambda *args: network(params, *args),
                key,
                image,
                label,
                state,
                num_classes=NUM_CLASSES,
                timestep_sampler=timestep_sampler,
            )
            seg, _ = idf.segmentation_loss(out.logits, label)
            return jnp.mean(out.weight * seg), (out.t, seg)

        grads, (t, seg) = jax.grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        return params, timestep_sampler.update(state, t, seg), jnp.mean(seg)

    state = timestep_sampler.init(diffusion.num_timesteps)
    losses = []
    for step in range(150):
        params, state, loss = train_step(params, state, jax.random.key(100 + step))
        losses.append(float(loss))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert int(state.count.sum()) == 150 * 8 and int(state.count[-1]) == 0  # t < T − 1

    logits = jax.jit(
        lambda key: idf.sample(
            diffusion,
            lambda *args: network(params, *args),
            key,
            image,
            num_classes=NUM_CLASSES,
            num_steps=3,
        )
    )(jax.random.key(3))
    accuracy = jnp.mean(jnp.argmax(logits[..., -1], -1) == label)
    assert float(accuracy) > 0.95
