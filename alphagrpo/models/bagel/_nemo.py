"""The one place where BAGEL's modules are imported from nemo-automodel, and the two patches they need here.

BAGEL's modules (the packed MoT Qwen2, the SigLIP-NaViT ViT, the autoencoder, ``BagelConfig``) come from the PyPI
package ``nemo-automodel==0.7.0``, installed without its dependencies (its full set pins another transformers, pulls
CUDA-only wheels and downgrades numpy)::

    pip install --no-deps nemo-automodel==0.7.0 einops

``require()`` imports them lazily (no work at import time of ``alphagrpo``) and applies, once:

1. Output class. Under transformers 5.x, nemo's ``BaseNavitOutputWithPast`` (a ``transformers.ModelOutput``) fails
   when built: ``ModelOutput`` renames the ``past_key_values`` keyword to ``cache`` and the dataclass then rejects it.
   Its module looks the class up by name at call time, so a plain dataclass with the same two fields put in its place
   (``NavitOutput``) is what every decoder call returns. Nothing else reads the ``ModelOutput`` behaviour.
2. Attention. The Qwen2 and SigLIP modules call flash-attn through module-level functions ``_flash_attn_varlen``
   (raising without flash-attn). Both are pointed at ``alphagrpo.models.bagel.attention.varlen_attention``, which
   chooses flash-attn's varlen kernel or PyTorch SDPA (see that module: the choice is made there, in one place).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Optional

INSTALL = "pip install --no-deps nemo-automodel==0.7.0 einops peft"
_NS: Optional[types.SimpleNamespace] = None


@dataclasses.dataclass
class NavitOutput:
    """Stands in for nemo's ``BaseNavitOutputWithPast`` (see the module docstring, patch 1)."""
    packed_query_sequence: Any = None
    past_key_values: Any = None


def require() -> types.SimpleNamespace:
    """nemo-automodel's BAGEL modules, patched (once). Raises ``ImportError`` naming the extra and the install line."""
    global _NS
    if _NS is not None:
        return _NS
    try:
        import einops  # noqa: F401  (imported by nemo's BAGEL package; checked here for a clear message)
        from nemo_automodel.components.models.bagel import autoencoder, configuration, model
        from nemo_automodel.components.models.bagel import modeling_qwen2_packed as qwen2
        from nemo_automodel.components.models.bagel import modeling_siglip_navit as siglip
    except ImportError as e:
        raise ImportError(f"model.kind=bagel needs the `bagel` extra (BAGEL's modules from nemo-automodel, installed "
                          f"without its dependencies): `{INSTALL}` (missing: {e.name or e})") from e
    from alphagrpo.models.bagel.attention import varlen_attention

    qwen2.BaseNavitOutputWithPast = NavitOutput
    qwen2._flash_attn_varlen = varlen_attention
    siglip._flash_attn_varlen = varlen_attention
    _NS = types.SimpleNamespace(qwen2=qwen2, siglip=siglip, autoencoder=autoencoder, configuration=configuration,
                                model=model, BagelConfig=configuration.BagelConfig,
                                Bagel=model.BagelForUnifiedMultimodal, AutoEncoder=autoencoder.AutoEncoder,
                                AutoEncoderParams=autoencoder.AutoEncoderParams,
                                SiglipVisionConfig=siglip.SiglipVisionConfig, NaiveCache=qwen2.NaiveCache)
    return _NS


def require_peft():
    """peft (LoRA on BAGEL); ``ImportError`` naming the extra otherwise."""
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"LoRA on BAGEL uses peft, part of the `bagel` extra: `pip install peft` ({e})") from e
    return peft
