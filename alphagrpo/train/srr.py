"""Self-reflective refinement (RECIPE.md sections 1 and 7): the reflection instruction, stage 1 (the worst of M
deterministic samples per prompt becomes the initial image), the refinement requests of stage 2, and the
False-Positive Rectification of the rewards. The trainer and inference-time refinement both build on these.

The instruction keeps the recipe's wording, lower-cased and with spaced punctuation so that the word-level TinyUMM
tokenizer reads it; a policy with a real tokenizer receives the same text.
"""
from __future__ import annotations

from typing import Sequence

import torch

from alphagrpo.advantages import rectify_false_positives
from alphagrpo.models.policy import GenRequest, has_think, policy_sigmas
from alphagrpo.sampler import sample_flow

REFLECTION = ("the user asked for an image of {prompt} . you tried and failed to produce the correct image . "
              "reflect on what went wrong and write the editing instruction .")


def reflection_instruction(prompt: str) -> str:
    """The SRR reflection instruction of RECIPE.md section 1."""
    return REFLECTION.format(prompt=prompt)


def reflection_words() -> list:
    """The words of the reflection instruction (besides the prompt's), for word-level vocabularies."""
    return sorted(set(REFLECTION.replace("{prompt}", "").split()))


def check_srr_policy(policy) -> None:
    """SRR conditions a think text on an input image: refuse a policy without a text path, naming the setting."""
    if not has_think(policy):
        raise ValueError(f"task=srr (self-reflective refinement) needs a policy that writes think text; "
                         f"{type(policy).__name__} has none (has_think=False): train it with task=rt2i")


def refinement_requests(records: Sequence[dict], images, repeat: int = 1) -> list:
    """Stage-2 requests: each record's prompt with its initial image and the reflection instruction, ``repeat``
    times in a row (a group)."""
    return [GenRequest(r["prompt"], image=images[i], instruction=reflection_instruction(r["prompt"]))
            for i, r in enumerate(records) for _ in range(repeat)]


@torch.no_grad()
def initial_images(policy, reward, records: Sequence[dict], *, samples: int, num_steps: int, shift: float,
                   cfg, generator: torch.Generator, batch: int, grid: str = "flow"):
    """Stage 1: ``samples`` deterministic ODE samples per prompt without think text, scored; keep the
    lowest-reward one. Returns ``(images: list of uint8 [H, W, 3], rewards [P])``."""
    reqs = [GenRequest(r["prompt"]) for r in records for _ in range(samples)]
    recs = [r for r in records for _ in range(samples)]
    sig = policy_sigmas(policy, num_steps, shift, grid)
    images, rewards = [], []
    for a in range(0, len(reqs), batch):
        part = reqs[a:a + batch]
        cond = policy.image_condition(part, None, cfg)
        x, _ = sample_flow(policy, cond, len(part), sigmas=sig, noise_level=0.0, window=None, generator=generator,
                           device=policy.device)
        imgs = policy.decode(x)
        images.extend(list(imgs))
        rewards.append(reward(list(imgs), recs[a:a + batch]).rewards)
    r = torch.cat(rewards).reshape(len(records), samples)
    worst = r.argmin(dim=1)
    return ([images[i * samples + int(worst[i])] for i in range(len(records))],
            r.gather(1, worst[:, None]).squeeze(1))


def rectify(rewards: torch.Tensor, init_rewards: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """FPR: a refinement that does not beat its initial image gets the initial image's reward (RECIPE section 7)."""
    return rectify_false_positives(rewards, init_rewards) if enabled else rewards
