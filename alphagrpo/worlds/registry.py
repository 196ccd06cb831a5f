"""Worlds by name (``data.world``): ``shapes`` (the embedded default) and ``jsonl`` (your prompts in the authors'
schema). A loader is ``loader(data: DataConfig) -> World``; ``register_world`` adds one (or name it as
``module:function``)."""
from __future__ import annotations

import importlib
from typing import Callable, Union

_WORLDS: dict[str, Union[str, Callable]] = {
    "shapes": "alphagrpo.worlds.shapes.world:load_shapes_world",
    "jsonl": "alphagrpo.worlds.jsonl:load_jsonl_world",
}


def register_world(name: str, loader: Union[str, Callable]) -> None:
    _WORLDS[name] = loader


def world_names() -> tuple[str, ...]:
    return tuple(_WORLDS)


def load_world(data):
    """The world ``data.world`` names, built from the data settings."""
    target = _WORLDS.get(data.world, data.world if ":" in data.world else None)
    if target is None:
        raise ValueError(f"unknown data.world {data.world!r}; choose one of {', '.join(_WORLDS)} or name a loader "
                         "as module:function")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target(data)
