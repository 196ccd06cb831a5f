"""Supervised pretraining of TinyUMM on rendered scenes (the library behind ``alphagrpo pretrain``).

Each example is drawn fresh from a training prompt: a satisfying scene is sampled and rendered.
- T2I: prompt -> plan text (LM loss), prompt + plan -> image (flow matching, with CFG dropout).
- Edit (for refinement): a corrupted version of the scene is the input image; the think text names what is wrong
  and gives the corrected plan; the target is the right image.
Reproducible from ``--seed``; ``--minutes`` bounds wall time (the step count reached is recorded). Ends with a
held-out evaluation per task type, written next to the checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from alphagrpo.models.policy import GenRequest
from alphagrpo.train.srr import reflection_instruction, reflection_words

log = logging.getLogger(__name__)

MODEL_SIZES = {"tiny": dict(dim=128, n_layers=4, n_heads=4, max_positions=320),
               "micro": dict(dim=64, n_layers=2, n_heads=2, max_positions=320)}


def make_batch(world, records, rng: np.random.Generator, edit_frac: float, think_drop: float = 0.0,
               reflect_drop: float = 0.0):
    """Requests, think texts and target images (uint8 ``[B, H, W, 3]``) for one pretraining batch. ``think_drop``:
    the fraction of T2I examples whose think text is empty (the model learns to draw from the prompt alone there,
    and to answer ``<eot>`` at once about that often: a model that reasons before drawing only sometimes).
    ``reflect_drop``: the same for refinement examples (redraw from the prompt and the wrong image, no diagnosis)."""
    reqs, thinks, imgs = [], [], []
    for r in records:
        if world.sample_edit is not None and rng.random() < edit_frac:
            wrong, think, right = world.sample_edit(r, rng)
            reqs.append(GenRequest(r["prompt"], image=wrong, instruction=reflection_instruction(r["prompt"])))
            thinks.append("" if reflect_drop and rng.random() < reflect_drop else think)
            imgs.append(right)
        else:
            plan, img = world.sample_target(r, rng)
            reqs.append(GenRequest(r["prompt"]))
            thinks.append("" if think_drop and rng.random() < think_drop else plan)
            imgs.append(img)
    return reqs, thinks, np.stack(imgs)


def pretrain(world, *, out: Path, size: str = "tiny", steps: int = 20000, minutes: float = 0.0, batch: int = 64,
             lr: float = 1e-3, edit_frac: float = 0.25, seed: int = 0, log_every: int = 100, extra_words=(),
             init: Optional[str] = None, train_shift: float = 3.0, stop_after: int = 0, device: str = "cpu",
             think_drop: float = 0.0, reflect_drop: float = 0.0):
    """Train a fresh TinyUMM (or continue ``init``); save it to ``out``. Returns ``(policy, report dict)``.
    ``train_shift`` skews the flow-matching noise levels towards high sigma (where the layout must come from the
    text alone). ``think_drop``, ``reflect_drop``: see :func:`make_batch`."""
    for name, v in (("think_drop", think_drop), ("reflect_drop", reflect_drop)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (the fraction of examples without think text), got {v}")
    from alphagrpo.models.tiny_policy import TinyUMMPolicy
    torch.manual_seed(seed)  # parameter initialisation only; data and noise use explicit generators below
    words = list(world.words) + reflection_words() + list(extra_words)
    if init:
        policy = TinyUMMPolicy.from_pretrained(init)
        missing = sorted(set(words) - set(policy.tok.stoi))
        if missing:
            raise ValueError(f"checkpoint {init} lacks words of this world: {missing[:10]}; pretrain from scratch")
        prior = json.loads((Path(init) / "config.json").read_text()).get("pretrain")
    else:
        policy = TinyUMMPolicy.create(sorted(set(words)), **MODEL_SIZES[size])
        prior = None
    model = policy.model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = min(500, max(1, steps // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining TinyUMM-%s (%.2fM parameters) for up to %d steps%s", size, n_params / 1e6, steps,
             f" or {minutes} min" if minutes else "")
    ema = None
    done = 0
    for step in range(steps):
        idx = rng.integers(0, len(world.train), size=batch)
        reqs, thinks, imgs = make_batch(world, [world.train[i] for i in idx], rng, edit_frac, think_drop,
                                        reflect_drop)
        lm, flow = policy.supervised_losses(reqs, thinks, imgs, generator=gen, shift=train_shift)
        loss = lm + flow
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        cur = (lm.item(), flow.item())
        ema = cur if ema is None else tuple(0.98 * a + 0.02 * b for a, b in zip(ema, cur))
        if done % log_every == 0:
            el = time.time() - t0
            log.info("pretrain step %6d | lm %.4f | flow %.4f | lr %.2e | %.1f ex/s | %.1f min", done, ema[0], ema[1],
                     sched.get_last_lr()[0], done * batch / el, el / 60)
        if (minutes and time.time() - t0 > minutes * 60) or (stop_after and done >= stop_after):
            break
    elapsed = time.time() - t0
    report = {"size": size, "parameters": n_params, "steps": done, "batch": batch, "lr": lr, "seed": seed,
              "edit_frac": edit_frac, "minutes": elapsed / 60, "lm_loss": ema[0] if ema else None,
              "flow_loss": ema[1] if ema else None, "threads": torch.get_num_threads(), "train_shift": train_shift,
              "init": str(init) if init else None, "previous": prior, "device": str(device),
              "think_drop": think_drop, "reflect_drop": reflect_drop}
    policy.save_pretrained(out, extra={"pretrain": report})
    return policy, report
