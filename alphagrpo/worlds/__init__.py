"""Embedded worlds: small, fully known domains in which the whole recipe runs for real on a CPU.

A world provides primitives, a renderer, Primitive-to-Prompt generators (prompt, plan, decomposed questions), and a
programmatic verifier that answers the questions from pixels: ``shapes`` (``alphagrpo.worlds.shapes``). The
``jsonl`` world (``alphagrpo.worlds.jsonl``) holds your own prompts and questions, with no judge. Worlds are loaded by
name through ``alphagrpo.worlds.registry``. Importing this package does no work.
"""

WORLDS = ("shapes", "jsonl")

__all__ = ["WORLDS"]
