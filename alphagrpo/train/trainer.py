"""The GRPO trainer of RECIPE.md sections 2-7: rollout -> asynchronous DVReward -> advantages (+FPR) -> losses ->
one on-policy update. It calls only the ``Policy`` protocol, a ``DVReward`` (any ``Verifier`` behind it) and the
losses of ``alphagrpo.kernels`` (the fused kernels when they apply, through the kernels' single dispatch switch).

One step (RT2I): P prompts x G samples; think text sampled with old log-probs (policies with ``has_think``); the
image path sampled with one SDE window per step and rank on the run's grid (``sampler.grid``); rollout runs in
chunks whose rewards are computed in a worker thread while the next chunk rolls out; global-std advantages; skip
when all are zero; replay with grad (text via the AR loss, each window step via the flow loss), loss =
mean_j L_img,j + lambda * L_text; grad clip; AdamW. ``step`` returns a ``StepResult``.

KL (``loss.beta_text`` / ``loss.beta_image`` > 0): the reference is where the run started. For a LoRA run that is
the policy itself inside ``policy.reference()`` (adapters disabled, no second model); for full fine-tuning a frozen
copy (made here, or the run's saved one on resume).
SRR (RECIPE section 7, pieces in ``alphagrpo.train.srr``): stage 1 draws M ODE samples per prompt without think and
keeps the worst; stage 2 draws G refinements with think under the refinement CFG (``cfg_refine``) and a 40-step
sampler whose 5-step window starts in [0, 10]; FPR before advantages; skip when nothing improved.
Several ranks (``alphagrpo.train.parallel``): per-rank generators, rewards gathered for the std, the skip decision
taken on all ranks' advantages, prompts sharded by the run loop; the strategy (``parallel``: replicate or FSDP2)
gathers parameters for the rollout, synchronises gradients after the last backward and clips by the global norm.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from alphagrpo import kernels
from alphagrpo.advantages import group_advantages
from alphagrpo.kernels.sde import sde_mean_std
from alphagrpo.models.policy import CFGConfig, GenRequest, Policy, has_think, policy_sigmas
from alphagrpo.rewards import DVReward, RewardResult
from alphagrpo.sampler import sample_flow, sample_sde_window
from alphagrpo.train import srr as S
from alphagrpo.train.config import TrainConfig
from alphagrpo.train.dist import dist_info, gather_all
from alphagrpo.train.parallel import make_parallel
from alphagrpo.train.metrics import thought

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One chunk of samples, everything replay needs (tensors on the policy's device, no grad)."""
    requests: list
    think: Optional[list]          # LongTensors, or None (no think)
    think_logp: Optional[list]
    steps: list                    # StepRecord per window step
    images: Any                    # uint8 [n, H, W, 3]
    cfg: CFGConfig                 # the guidance rollout used (replay uses the same)
    reward_future: Any = None
    think_texts: Optional[list] = None   # decoded think texts (None: no think)


@dataclass
class StepResult:
    """What one ``GRPOTrainer.step`` did: its ``metrics`` (the logged line), the rollout ``chunks``, the prompt
    ``records`` per sample, the verifier's results per chunk (``scores``: ``RewardResult`` objects), the
    ``rewards`` (raw), the ``rectified`` ones (FPR; the raw ones for RT2I), the initial images' rewards (SRR, else
    None) and this rank's ``advantages``."""
    metrics: dict
    chunks: list
    records: list
    scores: list
    rewards: torch.Tensor
    rectified: torch.Tensor
    init: Optional[torch.Tensor]
    advantages: torch.Tensor


@dataclass
class StepStats:
    values: dict = field(default_factory=dict)

    def add(self, key, value, weight=1.0):
        s, w = self.values.get(key, (0.0, 0.0))
        self.values[key] = (s + float(value) * weight, w + weight)

    def mean(self):
        return {k: s / max(w, 1e-12) for k, (s, w) in self.values.items()}


class GRPOTrainer:
    """Runs GRPO steps for a ``Policy`` with a ``DVReward``. ``data`` yields prompt records (dicts)."""

    def __init__(self, policy: Policy, reward: DVReward, cfg: TrainConfig, *, generator: torch.Generator,
                 ref_policy: Optional[Policy] = None, parallel=None):
        """``ref_policy``: the KL anchor of a full fine-tuning run when ``loss.beta_text`` or ``loss.beta_image``
        > 0 (default: a frozen copy of ``policy`` as it is now; a resumed run passes its starting weights). A LoRA
        run's anchor is ``policy.reference()``; unused when both betas are 0. ``parallel``: the data-parallel
        strategy (default: the one ``cfg.parallel`` names); it is set up on ``policy`` here, before the optimizer
        sees the parameters (FSDP replaces them by sharded ones)."""
        self.policy, self.reward, self.cfg, self.gen = policy, reward, cfg, generator
        self.think = has_think(policy)
        if cfg.task in ("srr", "mixed"):
            S.check_srr_policy(policy)
        self.ref_policy = None
        if cfg.loss.beta_text > 0 or cfg.loss.beta_image > 0:
            if getattr(policy, "lora", None):
                if ref_policy is not None:
                    raise ValueError("a LoRA run's KL reference is the policy with its adapters disabled; do not "
                                     "pass ref_policy")
            else:
                self.ref_policy = ref_policy if ref_policy is not None else copy.deepcopy(policy)
                for p in self.ref_policy.trainable_parameters():
                    p.requires_grad_(False)
        self.parallel = parallel if parallel is not None else make_parallel(cfg, cfg.device)
        self.parallel.setup(policy)
        params = list(policy.trainable_parameters())
        if not params:
            raise ValueError(f"{type(policy).__name__} has no trainable parameters")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        self.params = params
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.reward.workers), thread_name_prefix="reward")
        self.device = torch.device(cfg.device)

    def close(self):
        self.pool.shutdown(wait=True)

    def reference(self):
        """A context yielding the KL reference: the frozen copy, or the policy with its adapters disabled."""
        if self.ref_policy is not None:
            return contextlib.nullcontext(self.ref_policy)
        return _adapters_off(self.policy)

    def state_dict(self) -> dict:
        """What exact resume needs from the trainer (besides the policy)."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])

    # ------------------------------------------------------------------ rollout
    def _score(self, images, records):
        return self.reward(list(images), records)

    def _rollout_chunk(self, requests, records, *, think: bool, sigmas, window, noise_level, cfg_guid):
        c = self.cfg
        th = None
        if think:
            th = self.policy.sample_think(requests, generator=self.gen, max_new_tokens=c.max_think_tokens,
                                          temperature=c.think_temperature)
        cond = self.policy.image_condition(requests, None if th is None else th.tokens, cfg_guid)
        x, steps = sample_flow(self.policy, cond, len(requests), sigmas=sigmas, noise_level=noise_level,
                               window=window, generator=self.gen, device=self.device)
        images = self.policy.decode(x)
        ro = Rollout(requests=list(requests), think=None if th is None else th.tokens,
                     think_logp=None if th is None else th.logp, steps=steps, images=images, cfg=cfg_guid,
                     think_texts=None if th is None else list(th.texts))
        ro.reward_future = self.pool.submit(self._score, images, list(records))
        return ro

    def rollout(self, records: Sequence[dict], *, srr: bool):
        """Sample ``len(records) * G`` trajectories in chunks; rewards overlap the next chunk. Returns
        ``(chunks, records_per_sample, group_ids, init_rewards per sample or None)``."""
        c, G = self.cfg, self.cfg.group_size
        init_rewards = None
        if srr:
            s = c.srr
            init_images, init_rewards = S.initial_images(
                self.policy, self.reward, records, samples=s.initial_samples, num_steps=s.num_steps,
                shift=c.sampler.shift, cfg=c.cfg, generator=self.gen, batch=c.micro_batch, grid=c.sampler.grid)
            reqs = S.refinement_requests(records, init_images, repeat=G)
            guidance = c.cfg_refine
        else:
            s = c.sampler
            reqs = [GenRequest(r["prompt"]) for r in records for _ in range(G)]
            guidance = c.cfg
        recs = [r for r in records for _ in range(G)]
        gids = [i for i in range(len(records)) for _ in range(G)]
        window = sample_sde_window(s.num_steps, s.window, s.window_starts, self.gen)
        sigmas = policy_sigmas(self.policy, s.num_steps, c.sampler.shift, c.sampler.grid)
        chunks = []
        for a in range(0, len(reqs), c.micro_batch):
            chunks.append(self._rollout_chunk(reqs[a:a + c.micro_batch], recs[a:a + c.micro_batch],
                                              think=self.think, sigmas=sigmas, window=window,
                                              noise_level=c.sampler.noise_level, cfg_guid=guidance))
        init = None if init_rewards is None else init_rewards.repeat_interleave(G)
        return chunks, recs, torch.tensor(gids), init

    # ------------------------------------------------------------------ replay
    def _replay_chunk(self, ro: Rollout, adv: torch.Tensor, weight: float, stats: StepStats):
        c, lc = self.cfg, self.cfg.loss
        n = len(ro.requests)
        if ro.think is not None and lc.text_weight > 0:
            rep = self.policy.think_replay(ro.requests, ro.think)
            logp_old = torch.cat(ro.think_logp).to(self.device)
            logp_ref = None
            if lc.beta_text > 0:
                with torch.no_grad(), self.reference() as refp:
                    ref = refp.think_replay(ro.requests, ro.think)
                    zeros = torch.zeros(len(ref.cu_seqlens) - 1, device=self.device)
                    logp_ref = kernels.ar_grpo_loss(ref.hidden, ref.weight, ref.targets, logp_old, zeros,
                                                    ref.cu_seqlens)[1]["logp"]
            host = {"cu_seqlens_host": rep.cu_seqlens_host} if getattr(rep, "cu_seqlens_host", None) else {}
            loss_t, m = kernels.ar_grpo_loss(rep.hidden, rep.weight, rep.targets, logp_old, adv,
                                             rep.cu_seqlens, level=lc.text_level, clip_low=lc.clip_low,
                                             clip_high=lc.clip_high, beta=lc.beta_text, logp_ref=logp_ref, **host)
            (lc.text_weight * loss_t * weight).backward()
            stats.add("loss_text", loss_t.item(), n)
            stats.add("clip_text", m["clip_frac"].item(), n)
            stats.add("ratio_text", m["ratio_mean"].item(), n)
            if lc.beta_text > 0:
                stats.add("kl_text", m["kl"].item(), n)
        if lc.image_weight == 0:
            return
        cond = self.policy.image_condition(ro.requests, ro.think, ro.cfg)
        cond_ref = None
        if lc.beta_image > 0:
            with torch.no_grad(), self.reference() as refp:
                cond_ref = refp.image_condition(ro.requests, ro.think, ro.cfg)
        K = len(ro.steps)
        for st in ro.steps:
            v = self.policy.velocity(st.x, st.sigma, cond)
            mean_ref = None
            if cond_ref is not None:
                with torch.no_grad(), self.reference() as refp:
                    v_ref = refp.velocity(st.x, st.sigma, cond_ref)
                    mean_ref = sde_mean_std(st.x, v_ref, st.sigma, st.sigma_next, c.sampler.noise_level)[0]
            loss_i, m = kernels.flow_grpo_loss(v, st.x, st.prev, st.sigma, st.sigma_next, c.sampler.noise_level,
                                               st.logp, adv, clip=lc.clip_image, adv_clip=lc.adv_clip,
                                               mean_ref=mean_ref, beta=lc.beta_image)
            (lc.image_weight * loss_i * weight / K).backward()
            stats.add("loss_image", loss_i.item(), n / K)
            stats.add("clip_image", m["clip_frac"].item(), n / K)
            stats.add("ratio_image_max", (m["ratio_max"] - 1).abs().item(), n / K)
            if mean_ref is not None:
                stats.add("kl_image", m["kl"].item(), n / K)

    def backward(self, chunks, adv: torch.Tensor, stats: Optional[StepStats] = None) -> StepStats:
        """Replay every chunk with grad and accumulate the step's loss gradient into ``.grad`` (no optimizer step);
        ``adv`` holds one advantage per sample, in chunk order."""
        stats = stats if stats is not None else StepStats()
        n_total, a = adv.numel(), 0
        for ro in chunks:
            n = len(ro.requests)
            self._replay_chunk(ro, adv[a:a + n], n / n_total, stats)
            a += n
        return stats

    def update(self, chunks, adv: torch.Tensor, stats: Optional[StepStats] = None) -> dict:
        """One optimizer step on this rank's ``chunks`` with advantages ``adv``: backward, gradient synchronisation
        across ranks, clipping by the global norm, AdamW. Returns the grad norm and the time split."""
        t = {}
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        self.backward(chunks, adv, stats)
        t1 = time.perf_counter()
        self.parallel.sync_grads(self.params)
        t2 = time.perf_counter()
        t["grad_norm"] = self.parallel.clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        t3 = time.perf_counter()
        t.update({"time_replay": t1 - t0, "time_comm": t2 - t1, "time_optimizer": t3 - t2})
        return t

    # ------------------------------------------------------------------ one step
    def step(self, records: Sequence[dict]) -> StepResult:
        """One GRPO step on ``records`` (this rank's prompts)."""
        c = self.cfg
        t0 = time.perf_counter()
        srr = c.task == "srr" or (c.task == "mixed" and
                                 float(torch.rand((), generator=self.gen)) < c.srr.mix)
        with self.parallel.gathered():      # FSDP: parameters gathered once for the whole rollout
            chunks, recs, gids, init = self.rollout(records, srr=srr)
        t1 = time.perf_counter()
        results: list[RewardResult] = [ro.reward_future.result() for ro in chunks]
        t2 = time.perf_counter()
        raw = torch.cat([r.rewards for r in results]).float()
        rewards = S.rectify(raw, init, c.reward.fpr) if srr else raw
        rank, world = dist_info()
        all_r = gather_all(rewards)
        all_g = gather_all(gids + rank * len(records))  # group labels unique across ranks
        adv_all = group_advantages(all_r, all_g, std=c.loss.adv_std, eps=c.loss.adv_eps)
        adv = adv_all[rank * rewards.numel():(rank + 1) * rewards.numel()].to(self.device)
        metrics = {"reward_mean": float(raw.mean()), "reward_std": float(raw.std(correction=0)),
                   "srr": int(srr), "samples": rewards.numel()}
        texts = [t for ro in chunks if ro.think_texts is not None for t in ro.think_texts]
        if texts:  # how often the policy wrote a think text (RT2I: reasoned; SRR: wrote a diagnosis)
            metrics["think_rate"] = float(sum(thought(texts)) / len(texts))
        if srr:
            metrics["improved_frac"] = float((raw > init).float().mean())
            metrics["init_reward"] = float(init.mean())
        stats = StepStats()
        skipped = bool((adv_all == 0).all())    # all ranks' advantages: every rank takes the same decision
        times = {"time_replay": 0.0, "time_comm": 0.0, "time_optimizer": 0.0}
        if not skipped:
            times.update(self.update(chunks, adv, stats))
            metrics["grad_norm"] = times.pop("grad_norm")
        else:
            self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        metrics.update(stats.mean())
        metrics.update({"skipped": int(skipped), "time_rollout": t1 - t0, "time_reward_wait": t2 - t1,
                        "time_train": t3 - t2, **times, "time_step": t3 - t0,
                        "samples_per_s": rewards.numel() / max(t3 - t0, 1e-9)})
        return StepResult(metrics=metrics, chunks=chunks, records=recs, scores=results, rewards=raw,
                          rectified=rewards, init=init, advantages=adv.detach().cpu())


@contextlib.contextmanager
def _adapters_off(policy):
    with policy.reference():
        yield policy
