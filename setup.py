"""One distribution, three import packages: ``alphagrpo``, ``verifier_engine`` and the top-level ``kernels/``
folder installed as ``alphagrpo.kernels`` (never as a top-level ``kernels``: that name belongs to a PyPI package
that transformers probes for)."""
from setuptools import find_packages, setup

alphagrpo_pkgs = [p for p in find_packages(include=["alphagrpo", "alphagrpo.*"])]
kernel_pkgs = ["alphagrpo.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]
verifier_pkgs = find_packages(include=["verifier_engine", "verifier_engine.*"])

setup(
    packages=alphagrpo_pkgs + kernel_pkgs + verifier_pkgs,
    package_dir={"alphagrpo.kernels": "kernels"},
    package_data={"alphagrpo": ["assets/*", "assets/**/*"]},
)
