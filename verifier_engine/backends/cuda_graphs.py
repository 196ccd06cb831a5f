"""CUDA-graph capture and replay of the native backend's suffix pass, per shape bucket.

Why: a suffix pass of a few hundred tokens through a 2-3B decoder launches ~20 kernels per layer; for small
batches (one image, a server under light load) the launch overhead is as large as the GPU work. Replaying a captured
graph removes it. Where it does not pay (large passes, GPU-bound) the eager path runs: only passes of at most
``max_tokens`` padded tokens are captured.

How: the suffix function is pure tensor code with shapes taken from its inputs, so it is captured once per bucket
``(rows rounded up to a power of two, suffix length, images rounded up to a power of two, prefix length)`` into
static input buffers; padded rows score garbage that is sliced away. Prefix KV is copied into static buffers shared
by every graph of the same ``(images, prefix length)``. All graphs share one memory pool (they never run at once).
The first replay of every new graph is checked against the eager pass on the same inputs (scores within
``tolerance``); any capture failure or mismatch logs a warning and turns graphs off for this verifier: the eager
path is always correct.
Not tested on a GPU in CI (no GPU there); ``tests/test_verifier_native.py`` has a CUDA-only equality test.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class SuffixGraphs:
    """Replays ``fn(ids, pos, lengths, img, kv) -> logits`` from captured CUDA graphs when it pays."""

    def __init__(self, fn, n_yes: int, max_tokens: int = 4096, max_graphs: int = 48, tolerance: float = 1e-2):
        self.fn = fn
        self.n_yes = n_yes
        self.tolerance = tolerance
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.kv_buffers: dict[tuple, list] = {}
        self.pool = None
        self.disabled = False
        self.replays = 0

    def run(self, ids, pos, lengths, img, kv):
        N, L = ids.shape
        B, P = kv[0][0].shape[0], kv[0][0].shape[2]
        key = (_pow2(N), L, _pow2(B), P)
        if self.disabled or key[0] * L > self.max_tokens:
            return self.fn(ids, pos, lengths, img, kv)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(ids, pos, lengths, img, kv)
            try:
                entry = self._capture(key, kv)
            except Exception as e:  # capture is an optimisation; the eager path is always right
                log.warning("CUDA graph capture failed (%s: %s); using the eager suffix pass from now on",
                            type(e).__name__, e)
                self.disabled = True
                return self.fn(ids, pos, lengths, img, kv)
            eager = self.fn(ids, pos, lengths, img, kv)
            graphed = self._replay(entry, ids, pos, lengths, img, kv)
            err = (self._p(eager) - self._p(graphed)).abs().max().item()
            if not err <= self.tolerance:  # also catches NaN
                log.warning("CUDA graph replay differs from the eager pass by %.3g; graphs off from now on", err)
                self.disabled = True
                return eager
            self.graphs[key] = entry
            return graphed
        return self._replay(entry, ids, pos, lengths, img, kv)

    def _p(self, logits):
        return (logits[:, :self.n_yes].logsumexp(-1) - logits[:, self.n_yes:].logsumexp(-1)).sigmoid()

    def _replay(self, entry, ids, pos, lengths, img, kv):
        N, B = ids.shape[0], kv[0][0].shape[0]
        graph, s_ids, s_pos, s_len, s_img, s_kv, out = entry
        s_ids.zero_()
        s_ids[:N].copy_(ids)
        s_pos.zero_()
        s_pos[:N].copy_(pos)
        s_len.fill_(1)
        s_len[:N].copy_(lengths)
        s_img.zero_()
        s_img[:N].copy_(img)
        for (sk, sv), (k, v) in zip(s_kv, kv):
            sk[:B].copy_(k)
            sv[:B].copy_(v)
        graph.replay()
        self.replays += 1
        return out[:N].clone()

    def _capture(self, key, kv):
        import torch
        Nb, L, Bb, P = key
        dev = kv[0][0].device
        s_ids = torch.zeros(Nb, L, dtype=torch.long, device=dev)
        s_pos = torch.zeros(Nb, L, dtype=torch.long, device=dev)
        s_len = torch.ones(Nb, dtype=torch.long, device=dev)
        s_img = torch.zeros(Nb, dtype=torch.long, device=dev)
        kv_key = (Bb, P)
        if kv_key not in self.kv_buffers:
            self.kv_buffers[kv_key] = [
                (k.new_zeros((Bb,) + tuple(k.shape[1:])), v.new_zeros((Bb,) + tuple(v.shape[1:]))) for k, v in kv]
        s_kv = self.kv_buffers[kv_key]
        graph, out = self._record(s_ids, s_pos, s_len, s_img, s_kv)
        log.debug("captured suffix graph %s", key)
        return graph, s_ids, s_pos, s_len, s_img, s_kv, out

    def _record(self, *static):
        """Capture ``fn(*static)``; returns ``(graph, output)``. The only CUDA-specific step."""
        import torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream (allocator, cuBLAS workspaces)
            for _ in range(2):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*static)
        return graph, out
