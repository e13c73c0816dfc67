"""imgx_diffusion: Gaussian diffusion for segmentation with any network (jax, chex, numpy)."""

from imgx_diffusion.gaussian_diffusion import (
    MODEL_OUTPUTS,
    VARIANCES,
    GaussianDiffusion,
    normal_kl,
)
from imgx_diffusion.losses import (
    SegmentationLossWeights,
    cross_entropy_loss,
    dice_loss,
    focal_loss,
    segmentation_loss,
)
from imgx_diffusion.sampling import (
    SAMPLERS,
    Ensemble,
    allowed_num_sampling_steps,
    ensemble_from_probabilities,
    sample,
    sample_ensemble,
    sampling_diffusion,
)
from imgx_diffusion.schedules import BETA_SCHEDULES, beta_schedule, respacing_indices
from imgx_diffusion.segmentation import (
    ModelPrediction,
    label_from_probabilities,
    logits_from_x,
    mask_from_label,
    mask_from_x,
    probabilities_from_logits,
    read_model_output,
    x0_from_logits,
    x_from_mask,
)
from imgx_diffusion.strategies import (
    SELF_CONDITIONING_STRATEGIES,
    STRATEGIES,
    ModelFn,
    StrategyOutput,
    apply_strategy,
    model_input,
)
from imgx_diffusion.timestep_sampler import (
    TIMESTEP_SAMPLERS,
    TimestepSampler,
    TimestepSamplerState,
)

__version__ = "0.1.0"

__all__ = [
    "BETA_SCHEDULES",
    "MODEL_OUTPUTS",
    "SAMPLERS",
    "SELF_CONDITIONING_STRATEGIES",
    "STRATEGIES",
    "TIMESTEP_SAMPLERS",
    "VARIANCES",
    "Ensemble",
    "GaussianDiffusion",
    "ModelFn",
    "ModelPrediction",
    "SegmentationLossWeights",
    "StrategyOutput",
    "TimestepSampler",
    "TimestepSamplerState",
    "allowed_num_sampling_steps",
    "apply_strategy",
    "beta_schedule",
    "cross_entropy_loss",
    "dice_loss",
    "ensemble_from_probabilities",
    "focal_loss",
    "label_from_probabilities",
    "logits_from_x",
    "mask_from_label",
    "mask_from_x",
    "model_input",
    "normal_kl",
    "probabilities_from_logits",
    "read_model_output",
    "respacing_indices",
    "sample",
    "sample_ensemble",
    "sampling_diffusion",
    "segmentation_loss",
    "x0_from_logits",
    "x_from_mask",
]
