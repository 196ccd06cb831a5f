"""The STYLE.md tolerance rule shared by the kernel tests: the kernel's error against a float64 oracle is at most
twice plain PyTorch's error in the same dtype, plus one rounding of the output dtype at the quantity's scale."""
import torch


def _rule(name, got, plain, oracle):
    oracle = oracle.double()
    err_k = (got.double() - oracle).abs().max().item()
    err_p = (plain.double() - oracle).abs().max().item()
    # plus one rounding of the output dtype at the quantity's scale (a 16-bit output may round the other way)
    atol = max(1e-6, torch.finfo(got.dtype).eps) * max(oracle.abs().max().item(), 1e-3)
    assert err_k <= 2 * err_p + atol, f"{name}: kernel error {err_k:.3e} > 2 x torch error {err_p:.3e} + {atol:.1e}"
