"""Evaluation library: sampling settings (``EvalSettings``), generation and held-out evaluation, inference-time
refinement, and figures. Below the commands; never imports them."""
