"""Rank function of tests/test_bagel.py's FSDP2 test (``torch.multiprocessing.spawn`` imports it by module name)."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def lora_loss_and_grads(folder: str, shard: bool) -> tuple:
    """The tiny BAGEL with seeded LoRA (B perturbed), a think-replay + velocity loss, its LoRA gradients (full
    tensors). With ``shard`` the policy is first wrapped by the training loop's FSDP2 strategy, and a think sample
    runs through the sharded model (no grad) before the loss."""
    from alphagrpo.models.policy import CFGConfig, GenRequest
    from alphagrpo.models.registry import ModelConfig, load_policy
    pol = load_policy(ModelConfig(kind="bagel", path=folder, dtype="bfloat16", gradient_checkpointing=True))
    pol.enable_lora(4, 8.0, seed=0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in sorted(pol.bagel.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if shard:
        from alphagrpo.train.config import apply_overrides, get_recipe
        from alphagrpo.train.parallel import FSDP
        par = FSDP(apply_overrides(get_recipe("bagel_rt2i"), ["device=cpu", "parallel.strategy=fsdp"]).parallel,
                   "cpu")
        par.setup(pol)
        with torch.no_grad(), par.gathered():
            pol.sample_think([GenRequest("a cat")], generator=torch.Generator().manual_seed(0), max_new_tokens=3)
    reqs = [GenRequest("a red circle"), GenRequest("two blue squares")]
    eos = pol.special["eos"]
    think = [torch.tensor([5, 6, 7, eos]), torch.tensor([9, eos])]
    x = torch.randn(2, *pol.latent_shape, generator=torch.Generator().manual_seed(2))
    rep = pol.think_replay(reqs, think)
    lp = torch.log_softmax(rep.hidden.float() @ rep.weight.float().t(), -1).gather(1, rep.targets[:, None]).sum()
    loss = pol.velocity(x, 0.7, pol.image_condition(reqs, think, CFGConfig())).pow(2).mean() + lp
    loss.backward()
    grads = {}
    for n, p in pol.bagel.named_parameters():
        if p.grad is not None:
            gr = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[n.replace("_checkpoint_wrapped_module.", "")] = gr.detach().clone()
    return float(loss.detach()), grads


def fsdp_worker(rank: int, world: int, init_file: str, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        loss, grads = lora_loss_and_grads(folder, shard=True)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out)
    finally:
        dist.destroy_process_group()
