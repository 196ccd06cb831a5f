"""Training, evaluation, refinement and the demo: the commands of the `alphagrpo` CLI."""
