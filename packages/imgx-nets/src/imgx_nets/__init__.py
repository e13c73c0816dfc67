"""imgx_nets: 2D/3D transformer U-Net and memory-efficient attention in Flax NNX."""

from imgx_nets.attention import (
    dot_product_attention,
    dot_product_attention_reference,
    efficient_dot_product_attention,
)
from imgx_nets.functional import ModelFn, SliceWise, apply, as_model_fn, parameter_count, summary
from imgx_nets.layers import sinusoidal_embedding
from imgx_nets.unet import DECODERS, UNet

__version__ = "0.1.0"

__all__ = [
    "ModelFn",
    "SliceWise",
    "DECODERS",
    "UNet",
    "apply",
    "as_model_fn",
    "dot_product_attention",
    "dot_product_attention_reference",
    "efficient_dot_product_attention",
    "parameter_count",
    "sinusoidal_embedding",
    "summary",
]
