"""BAGEL-7B-MoT as the policy (``model.kind=bagel``): nemo-automodel's modules, our generation glue.

Importing this package imports neither nemo-automodel nor peft; ``load_bagel`` does, and names the ``bagel`` extra
when they are missing. See ``policy`` for the contexts, CFG and precision, ``loading`` for folders, ``attention`` for
the attention implementation, ``testing`` for the tiny random model, and docs/bagel.md for users.
"""
from __future__ import annotations


def load_bagel(model, path, device):
    """``model.kind=bagel`` loader (registry signature): see ``alphagrpo.models.bagel.policy.load_bagel``."""
    from alphagrpo.models.bagel.policy import load_bagel as _load
    return _load(model, path, device)


__all__ = ["load_bagel"]
