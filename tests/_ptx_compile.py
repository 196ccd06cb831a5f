"""Compile every Triton kernel of ``alphagrpo.kernels`` to PTX for sm_90 (H100/H200) without a GPU.

Run as a script in a process where ``TRITON_INTERPRET`` is unset (``tests/test_kernels_ptx.py`` does so): the
interpreter cannot tell a kernel that only interprets from one that compiles (non-constexpr globals, loop-carried
type changes, unsupported ops). Prints ``OK name`` or ``FAIL name: error`` per kernel; exit status 1 on a failure,
2 when this Triton cannot compile for CUDA here.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)


def main() -> int:
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"SKIP this Triton has no ahead-of-time compile API: {e}")
        return 2
    import alphagrpo.kernels.ar_grpo as A
    import alphagrpo.kernels.ar_grpo_tiled as T
    import alphagrpo.kernels.flow_grpo as F
    target = GPUTarget("cuda", 90, 32)

    def const(d):
        return {k: "constexpr" for k in d}

    ptrs = lambda names, ty: {n: ty for n in names}  # noqa: E731
    cases = []
    k_lse, k_dl = A._kernels(False)
    lse_c = dict(INV_T=1.0 / 0.9, BLOCK_V=4096)
    cases.append(("ar_lse_rows", k_lse, {**ptrs(["logits_ptr"], "*fp32"), "tok_ptr": "*i64",
                                         **ptrs(["lse_ptr", "logp_ptr"], "*fp32"), "V": "i32", "stride": "i32",
                                         **const(lse_c)}, lse_c))
    for out in ("*bf16", "*fp32"):
        cases.append((f"ar_dlogits_rows[{out}]", k_dl, {"logits_ptr": "*fp32", "out_ptr": out, "tok_ptr": "*i64",
                                                        **ptrs(["lse_ptr", "g_ptr"], "*fp32"), "V": "i32",
                                                        "stride": "i32", "out_stride": "i32", **const(lse_c)}, lse_c))
    t_lse, t_dl = T._kernels(False)
    tc = dict(INV_T=1.0, PRECISION="tf32", DOT_F32=False, BLOCK_N=128, BLOCK_V=128, BLOCK_K=64)
    cases.append(("tiled_lse", t_lse, {**ptrs(["h_ptr", "w_ptr"], "*bf16"), "tok_ptr": "*i64",
                                       **ptrs(["m_ptr", "s_ptr", "t_ptr"], "*fp32"),
                                       **ptrs(["N", "V", "H", "cols_per_split", "n_splits", "stride_h", "stride_w"],
                                              "i32"), **const(tc)}, tc))
    tdc = dict(tc, HAS_SCALE=False, GROUP=8)
    cases.append(("tiled_dlogits", t_dl, {**ptrs(["h_ptr", "w_ptr"], "*bf16"), "tok_ptr": "*i64",
                                          **ptrs(["lse_ptr", "g_ptr", "scale_ptr"], "*fp32"), "dl_ptr": "*bf16",
                                          **ptrs(["n_rows", "n_cols", "H", "col0", "stride_h", "stride_w"], "i32"),
                                          **const(tdc)}, tdc))
    f_fwd, f_bwd = F._kernels(False)
    sched = {**ptrs(["sig_ptr", "sn_ptr", "a_ptr", "sub_ptr"], "*fp32"),
             **ptrs(["s_sig", "s_sn", "s_a", "s_sub"], "i32")}
    for per in (False, True):
        for ref in (False, True):
            c = dict(HEAD=F._HEAD, LO=1 - 1e-5, HI=1 + 1e-5, ADV_CLIP=5.0, BETA=0.3, CLAMP=20.0, HAS_REF=ref,
                     SCHED=per, HAS_SUB=per, BLOCK=4096, BLOCK_B=32, BLOCK_C=16)
            cases.append((f"flow_fwd[sched={per},ref={ref}]", f_fwd, {
                **ptrs(["v_ptr", "x_ptr"], "*bf16"), "prev_ptr": "*fp32", "ref_ptr": "*bf16",
                **ptrs(["logp_old_ptr", "adv_ptr", "out_ptr"], "*fp32"), "counter_ptr": "*i32", **sched,
                **ptrs(["B", "D", "C"], "i32"), **ptrs(["cx", "cv", "std_s", "inv_b"], "fp32"), **const(c)}, c))
            c = dict(HEAD=F._HEAD, HAS_REF=ref, SCHED=per, HAS_SUB=per, NEED_GX=True, BLOCK=4096)
            cases.append((f"flow_bwd[sched={per},ref={ref}]", f_bwd, {
                "gout_ptr": "*fp32", **ptrs(["v_ptr", "x_ptr"], "*bf16"), "prev_ptr": "*fp32", "ref_ptr": "*bf16",
                "out_ptr": "*fp32", **ptrs(["gv_ptr", "gx_ptr"], "*bf16"), **sched, **ptrs(["B", "D"], "i32"),
                **ptrs(["cx", "cv"], "fp32"), **const(c)}, c))
    failed = 0
    for name, fn, sig, constexprs in cases:
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)
            assert "ptx" in k.asm and len(k.asm["ptx"]) > 1000
            print(f"OK {name}")
        except Exception as e:  # report every kernel, not only the first failure
            failed += 1
            msg = str(e).replace("\n", " | ")[:1500]
            if "ptxas" in msg.lower() and "not found" in msg.lower():
                print(f"SKIP no ptxas here: {msg}")
                return 2
            print(f"FAIL {name}: {type(e).__name__}: {msg}")
    print(f"triton {triton.__version__}: {len(cases) - failed}/{len(cases)} kernels compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
