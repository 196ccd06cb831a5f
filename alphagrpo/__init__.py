"""alphagrpo: the AlphaGRPO recipe (GRPO for unified multimodal models, DVReward, False-Positive Rectification).

The recipe's math is importable from here (RECIPE.md sections 2-7); the fused losses live in ``alphagrpo.kernels``.
Importing this package does no work: no logging set-up, no device probing, no downloads.
"""


def _kernels_from_source_checkout() -> None:
    """Make ``alphagrpo.kernels`` importable from a plain source checkout (no ``pip install``), e.g. a copy of the
    repository on a GPU machine run as ``python -m alphagrpo.cli`` from its root. An install maps the top-level
    ``kernels/`` folder to ``alphagrpo.kernels`` (setup.py); without one, load that folder under the same name."""
    import importlib.util
    import sys
    from pathlib import Path
    if "alphagrpo.kernels" in sys.modules or importlib.util.find_spec("alphagrpo.kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError("alphagrpo.kernels is missing: install the project (pip install -e .) from a full "
                                  "checkout, which maps its kernels/ folder to alphagrpo.kernels")
    spec = importlib.util.spec_from_file_location("alphagrpo.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["alphagrpo.kernels"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__], "kernels", module)


_kernels_from_source_checkout()

from alphagrpo.advantages import group_advantages, rectify_false_positives  # noqa: E402
from alphagrpo.rewards import DVReward, dvreward  # noqa: E402
from alphagrpo.sampler import euler_step, flow_sigmas, sample_sde_window, sde_step, sde_step_logprob  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "flow_sigmas", "sde_step", "euler_step", "sde_step_logprob", "sample_sde_window",
    "group_advantages", "rectify_false_positives", "dvreward", "DVReward", "__version__",
]
