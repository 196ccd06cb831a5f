"""Embedded worlds: small, fully known domains in which the whole recipe runs for real on a CPU.

A world provides primitives, a renderer, Primitive-to-Prompt generators (prompt, plan, decomposed questions), and a
programmatic verifier that answers the questions from pixels. The only world so far is ``shapes``
(``alphagrpo.worlds.shapes``); ``alphagrpo.worlds.cli`` is the ``alphagrpo data`` command. Importing this package
does no work.
"""

WORLDS = ("shapes",)

__all__ = ["WORLDS"]
