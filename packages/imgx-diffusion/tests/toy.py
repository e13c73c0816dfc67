"""A toy per-voxel linear network f(image, mask_input, t, key) for the tests."""

import jax


def init_params(key, in_channels, mask_channels, out_channels):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "image": 0.5 * jax.random.normal(k1, (in_channels, out_channels)),
        "mask": 0.5 * jax.random.normal(k2, (mask_channels, out_channels)),
        "time": 0.5 * jax.random.normal(k3, (out_channels,)),
    }


def apply(params, image, mask_input, t):
    """Per-voxel linear map of image and mask input plus a time term."""
    t = t.reshape(t.shape + (1,) * (image.ndim - 1))
    return image @ params["image"] + mask_input @ params["mask"] + t * params["time"]


def pass_indexed_model(params_per_pass, record=None):
    """Model function using params_per_pass[i] on its i-th call (trace order).

    Giving each pass its own parameters lets jax.grad tell which pass a gradient reaches.
    ``record`` (a list) collects (mask_input, t) of each call when run eagerly.
    """
    calls = []

    def model_fn(image, mask_input, t, key):
        del key
        params = params_per_pass[min(len(calls), len(params_per_pass) - 1)]
        calls.append(None)
        if record is not None:
            record.append((mask_input, t))
        return apply(params, image, mask_input, t)

    return model_fn
