"""The GRPO trainer of RECIPE.md sections 2-7: rollout -> asynchronous DVReward -> advantages (+FPR) -> losses ->
one on-policy update. It calls only the ``Policy`` protocol, a ``DVReward`` (any ``Verifier`` behind it) and the
losses of ``alphagrpo.kernels`` (the fused kernels when they apply, through the kernels' single dispatch switch).

One step (RT2I): P prompts x G samples; think text sampled with old log-probs; the image path sampled with one SDE
window per step and rank; rollout runs in chunks whose rewards are computed in a worker thread while the next
chunk rolls out; global-std advantages; skip when all are zero; replay with grad (text via the AR loss, each window
step via the flow loss), loss = mean_j L_img,j + lambda * L_text; grad clip; AdamW. With ``loss.beta_text`` /
``loss.beta_image`` > 0 a frozen reference policy (the run's starting weights) anchors both paths: the text loss
gets the k3 KL to the reference's token log-probs, the flow loss the Gaussian KL to the reference's SDE mean.
SRR (RECIPE section 7): stage 1 draws M ODE samples per prompt without think and keeps the worst; stage 2 draws G
refinements with think and a 40-step sampler whose 5-step window starts in [0, 10]; FPR before advantages; skip
when nothing improved. Distributed-ready: per-rank generators, rewards gathered for the std, prompts sharded.
"""
from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from alphagrpo import kernels
from alphagrpo.advantages import group_advantages, rectify_false_positives
from alphagrpo.kernels.sde import sde_mean_std
from alphagrpo.models.policy import GenRequest, Policy
from alphagrpo.rewards import DVReward
from alphagrpo.sampler import sample_flow, sample_sde_window
from alphagrpo.train.config import TrainConfig
from alphagrpo.train.evaluate import thought

log = logging.getLogger(__name__)

REFLECTION = ("the user asked for an image of {prompt} . you tried and failed to produce the correct image . "
              "reflect on what went wrong and write the editing instruction .")


def reflection_instruction(prompt: str) -> str:
    """The SRR reflection instruction of RECIPE.md section 1."""
    return REFLECTION.format(prompt=prompt)


def reflection_words() -> list:
    """The words of the reflection instruction (besides the prompt's), for word-level vocabularies."""
    return sorted(set(REFLECTION.replace("{prompt}", "").split()))


def dist_info():
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_all(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[n]`` tensors concatenated in rank order (a no-op in one process)."""
    rank, world = dist_info()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@dataclass
class Rollout:
    """One chunk of samples, everything replay needs (tensors on the policy's device, no grad)."""
    requests: list
    think: Optional[list]          # LongTensors, or None (no think)
    think_logp: Optional[list]
    steps: list                    # StepRecord per window step
    images: Any                    # uint8 [n, H, W, 3]
    reward_future: Any = None
    init_rewards: Optional[torch.Tensor] = None
    think_texts: Optional[list] = None   # decoded think texts (None: no think)


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
                 ref_policy: Optional[Policy] = None):
        """``ref_policy``: the KL anchor when ``loss.beta_text`` or ``loss.beta_image`` > 0 (default: a frozen copy of
        ``policy`` as it is now; a resumed run passes its starting checkpoint). Unused when both betas are 0."""
        self.policy, self.reward, self.cfg, self.gen = policy, reward, cfg, generator
        self.ref_policy = None
        if cfg.loss.beta_text > 0 or cfg.loss.beta_image > 0:
            self.ref_policy = ref_policy if ref_policy is not None else copy.deepcopy(policy)
            for p in self.ref_policy.trainable_parameters():
                p.requires_grad_(False)
        params = list(policy.trainable_parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        self.params = params
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.reward.workers), thread_name_prefix="reward")
        self.device = torch.device(cfg.device)

    def close(self):
        self.pool.shutdown(wait=True)

    # ------------------------------------------------------------------ rollout
    def _score(self, images, records):
        return self.reward(list(images), records)

    def _rollout_chunk(self, requests, records, *, think: bool, num_steps, window, noise_level, cfg_guid):
        c = self.cfg
        th = None
        if think:
            th = self.policy.sample_think(requests, generator=self.gen, max_new_tokens=c.max_think_tokens,
                                          temperature=c.think_temperature)
        cond = self.policy.image_condition(requests, None if th is None else th.tokens, cfg_guid)
        x, steps = sample_flow(self.policy, cond, len(requests), num_steps=num_steps, shift=c.sampler.shift,
                               noise_level=noise_level, window=window, generator=self.gen, device=self.device)
        images = self.policy.decode(x)
        ro = Rollout(requests=list(requests), think=None if th is None else th.tokens,
                     think_logp=None if th is None else th.logp, steps=steps, images=images,
                     think_texts=None if th is None else list(th.texts))
        ro.reward_future = self.pool.submit(self._score, images, list(records))
        return ro

    def rollout(self, records: Sequence[dict], *, srr: bool):
        """Sample ``len(records) * G`` trajectories in chunks; rewards overlap the next chunk. Returns
        ``(chunks, records_per_sample, group_ids, init_rewards or None, stage1_seconds)``."""
        c, G = self.cfg, self.cfg.group_size
        init_rewards, init_images = None, None
        if srr:
            init_images, init_rewards = self.initial_images(records)
        reqs, recs, gids = [], [], []
        for i, r in enumerate(records):
            for _ in range(G):
                if srr:
                    reqs.append(GenRequest(r["prompt"], image=init_images[i],
                                           instruction=reflection_instruction(r["prompt"])))
                else:
                    reqs.append(GenRequest(r["prompt"]))
                recs.append(r)
                gids.append(i)
        if srr:
            s = c.srr
            window = sample_sde_window(s.num_steps, s.window, s.window_starts, self.gen)
            num_steps = s.num_steps
        else:
            s = c.sampler
            window = sample_sde_window(s.num_steps, s.window, s.window_starts, self.gen)
            num_steps = s.num_steps
        chunks = []
        for a in range(0, len(reqs), c.micro_batch):
            chunks.append(self._rollout_chunk(reqs[a:a + c.micro_batch], recs[a:a + c.micro_batch], think=True,
                                              num_steps=num_steps, window=window,
                                              noise_level=c.sampler.noise_level, cfg_guid=c.cfg))
        init = None if init_rewards is None else init_rewards.repeat_interleave(G)
        return chunks, recs, torch.tensor(gids), init

    @torch.no_grad()
    def initial_images(self, records):
        """SRR stage 1: M deterministic ODE samples per prompt without think; keep the lowest-reward one."""
        c, M = self.cfg, self.cfg.srr.initial_samples
        reqs = [GenRequest(r["prompt"]) for r in records for _ in range(M)]
        recs = [r for r in records for _ in range(M)]
        images, rewards = [], []
        for a in range(0, len(reqs), c.micro_batch):
            part = reqs[a:a + c.micro_batch]
            cond = self.policy.image_condition(part, None, c.cfg)
            x, _ = sample_flow(self.policy, cond, len(part), num_steps=c.srr.num_steps, shift=c.sampler.shift,
                               noise_level=0.0, window=None, generator=self.gen, device=self.device)
            imgs = self.policy.decode(x)
            images.extend(list(imgs))
            rewards.append(self.reward(list(imgs), recs[a:a + c.micro_batch]).rewards)
        r = torch.cat(rewards).reshape(len(records), M)
        worst = r.argmin(dim=1)
        return [images[i * M + int(worst[i])] for i in range(len(records))], r.gather(1, worst[:, None]).squeeze(1)

    # ------------------------------------------------------------------ replay
    def _replay_chunk(self, ro: Rollout, adv: torch.Tensor, weight: float, stats: StepStats):
        c, lc = self.cfg, self.cfg.loss
        n = len(ro.requests)
        if ro.think is not None and lc.text_weight > 0:
            rep = self.policy.think_replay(ro.requests, ro.think)
            logp_old = torch.cat(ro.think_logp).to(self.device)
            logp_ref = None
            if lc.beta_text > 0:
                with torch.no_grad():
                    ref = self.ref_policy.think_replay(ro.requests, ro.think)
                    zeros = torch.zeros(len(ref.cu_seqlens) - 1, device=self.device)
                    logp_ref = kernels.ar_grpo_loss(ref.hidden, ref.weight, ref.targets, logp_old, zeros,
                                                    ref.cu_seqlens)[1]["logp"]
            loss_t, m = kernels.ar_grpo_loss(rep.hidden, rep.weight, rep.targets, logp_old, adv,
                                             rep.cu_seqlens, level=lc.text_level, clip_low=lc.clip_low,
                                             clip_high=lc.clip_high, beta=lc.beta_text, logp_ref=logp_ref)
            (lc.text_weight * loss_t * weight).backward()
            stats.add("loss_text", loss_t.item(), n)
            stats.add("clip_text", m["clip_frac"].item(), n)
            stats.add("ratio_text", m["ratio_mean"].item(), n)
            if lc.beta_text > 0:
                stats.add("kl_text", m["kl"].item(), n)
        if lc.image_weight == 0:
            return
        cond = self.policy.image_condition(ro.requests, ro.think, c.cfg)
        cond_ref = None
        if lc.beta_image > 0:
            with torch.no_grad():
                cond_ref = self.ref_policy.image_condition(ro.requests, ro.think, c.cfg)
        K = len(ro.steps)
        for st in ro.steps:
            v = self.policy.velocity(st.x, st.sigma, cond)
            mean_ref = None
            if cond_ref is not None:
                with torch.no_grad():
                    v_ref = self.ref_policy.velocity(st.x, st.sigma, cond_ref)
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

    # ------------------------------------------------------------------ one step
    def step(self, records: Sequence[dict]) -> dict:
        """One GRPO step on ``records`` (this rank's prompts). Returns the step's metrics."""
        c = self.cfg
        t0 = time.perf_counter()
        srr = c.task == "srr" or (c.task == "mixed" and
                                 float(torch.rand((), generator=self.gen)) < c.srr.mix)
        chunks, recs, gids, init = self.rollout(records, srr=srr)
        t1 = time.perf_counter()
        results = [ro.reward_future.result() for ro in chunks]
        t2 = time.perf_counter()
        rewards = torch.cat([r.rewards for r in results]).float()
        raw = rewards.clone()
        if srr and c.reward.fpr:
            rewards = rectify_false_positives(rewards, init)
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
            improved = raw > init
            metrics["improved_frac"] = float(improved.float().mean())
            metrics["init_reward"] = float(init.mean())
        stats = StepStats()
        skipped = bool((adv_all == 0).all())
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.backward(chunks, adv, stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.optim.grad_clip)
            self.optimizer.step()
            metrics["grad_norm"] = float(grad_norm)
        t3 = time.perf_counter()
        metrics.update(stats.mean())
        metrics.update({"skipped": int(skipped), "time_rollout": t1 - t0, "time_reward_wait": t2 - t1,
                        "time_train": t3 - t2, "samples_per_s": rewards.numel() / max(t3 - t0, 1e-9)})
        self.last_rollout = (chunks, results, recs)
        self.last_rewards = {"raw": raw, "rectified": rewards, "init": init, "advantages": adv.detach().cpu()}
        return metrics
