"""alphagrpo: the AlphaGRPO recipe (GRPO for unified multimodal models, DVReward, False-Positive Rectification).

The recipe's math is importable from here (RECIPE.md sections 2-7); the fused losses live in ``alphagrpo.kernels``.
Importing this package does no work: no logging set-up, no device probing, no downloads.
"""
from alphagrpo.advantages import group_advantages, rectify_false_positives
from alphagrpo.rewards import DVReward, dvreward
from alphagrpo.sampler import euler_step, flow_sigmas, sample_sde_window, sde_step, sde_step_logprob

__version__ = "0.1.0"

__all__ = [
    "flow_sigmas", "sde_step", "euler_step", "sde_step_logprob", "sample_sde_window",
    "group_advantages", "rectify_false_positives", "dvreward", "DVReward", "__version__",
]
