"""Training configuration: nested dataclasses with validation, and named recipes that return a full config.

``--set a.b=value`` overrides any field from the command line (``apply_overrides``). The resolved config is written
into the run folder. Sections: ``model`` (which policy: ``kind``, ``path``, ``dtype``), ``data`` (which world),
``reward`` (which verifier: ``reward.verifier``), ``sampler``, ``cfg`` / ``cfg_refine`` (text-to-image and refinement
guidance), ``loss``, ``optim``, ``lora``, ``srr``, ``parallel`` (data-parallel strategy under torchrun). Recipes:
``tiny_shapes`` (RT2I on the shapes world, CPU-sized) and ``tiny_shapes_srr`` (self-reflective refinement with FPR);
real-model recipes register beside their adapters.
Numbers that differ from the paper's BAGEL setup (RECIPE.md section 8) are CPU-sized and say so in their field's
comment.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from alphagrpo.models.policy import CFGConfig
from alphagrpo.models.registry import ModelConfig


@dataclass
class SamplerConfig:
    num_steps: int = 16            # RT2I rollout steps (RECIPE section 3)
    shift: float = 3.0             # grid shift s
    noise_level: float = 0.7       # SDE noise level a
    window: int = 10               # K stochastic, trained steps
    window_starts: tuple = (0, 1)  # allowed window starts, drawn uniformly per rollout
    eval_steps: int = 40           # ODE steps at evaluation
    grid: str = "flow"             # "flow": the recipe's shifted grid; "scheduler": the policy's own (diffusers)

    def __post_init__(self):
        if self.grid not in ("flow", "scheduler"):
            raise ValueError(f"sampler.grid must be 'flow' or 'scheduler', got {self.grid!r}")
        bad = [s for s in self.window_starts if s < 0 or s + self.window > self.num_steps]
        if bad or not self.window_starts:
            raise ValueError(f"sampler.window_starts {list(self.window_starts)} must be non-empty and fit "
                             f"start + window ({self.window}) <= num_steps ({self.num_steps})")
        if not 0 <= self.noise_level <= 2:
            raise ValueError(f"sampler.noise_level must be in [0, 2], got {self.noise_level}")


@dataclass
class LossConfig:
    clip_image: float = 1e-5       # image ratio clip (RECIPE section 6)
    adv_clip: float = 5.0          # image advantage clip
    clip_low: float = 0.2          # text ratio clip
    clip_high: float = 0.28
    text_level: str = "sequence"   # "sequence" (GSPO, the code's default) or "token"
    text_weight: float = 1.0       # lambda: 1.0 is the code's RT2I setting, 0.2 the SRR one
    image_weight: float = 1.0      # weight of the image (flow) loss; 0 trains the think text alone (ablation)
    beta_image: float = 0.0        # KL to the run's starting policy on the image path (RECIPE: optional, off)
    beta_text: float = 0.0         # k3 KL to the starting policy's think-token log-probs (optional, off)
    adv_std: str = "global"        # "global" (default) or "group"
    adv_eps: float = 1e-4

    def __post_init__(self):
        if self.text_level not in ("sequence", "token"):
            raise ValueError(f"loss.text_level must be 'sequence' or 'token', got {self.text_level!r}")
        if self.adv_std not in ("global", "group"):
            raise ValueError(f"loss.adv_std must be 'global' or 'group', got {self.adv_std!r}")
        if self.text_weight < 0 or self.image_weight < 0:
            raise ValueError("loss.text_weight (lambda) and loss.image_weight must be >= 0")
        if self.text_weight == 0 and self.image_weight == 0:
            raise ValueError("loss.text_weight and loss.image_weight are both 0: nothing would be trained")
        if self.beta_text < 0 or self.beta_image < 0:
            raise ValueError(f"loss.beta_text and loss.beta_image (KL weights) must be >= 0, got {self.beta_text} and "
                             f"{self.beta_image}")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")


@dataclass
class LoRAConfig:
    rank: int = 0                  # 0: full fine-tuning (the CPU recipes); > 0: train low-rank adapters (the paper)
    alpha: float = 16.0            # adapter scale alpha / rank
    targets: tuple = ()            # fnmatch patterns of linear layers; empty: the policy's default set

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = full fine-tuning), got {self.rank}")
        if self.rank and not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")


@dataclass
class RewardConfig:
    mode: str = "geometric"        # "geometric" (DVReward), "arithmetic", "semantic"
    binary: bool = False           # threshold scores at 0.5 (Table 4 ablation)
    holistic: bool = False         # one question "Does this image match: {prompt}?" (Table 5 ablation)
    fpr: bool = True               # False-Positive Rectification for refinement groups
    workers: int = 1               # reward threads overlapping the next rollout chunk
    verifier: str = "world"        # "world" (the world's own judge) or an address: http://HOST:PORT[,...] (verifier
                                   # servers), openai:MODEL@URL (SGLang/vLLM), native:PATH, hf:PATH
    on_failure: str = "zero"       # a question whose query fails after retries: "zero" (the authors') or "raise"
    timeout: float = 120.0         # seconds per verifier request attempt (servers)
    concurrency: int = 8           # verifier requests in flight (servers)

    def __post_init__(self):
        if self.on_failure not in ("zero", "raise"):
            raise ValueError(f"reward.on_failure must be 'zero' or 'raise', got {self.on_failure!r}")
        if self.workers < 1 or self.concurrency < 1 or not self.timeout > 0:
            raise ValueError("reward.workers and reward.concurrency must be >= 1 and reward.timeout > 0")
        from alphagrpo.verifiers import parse_address
        parse_address(self.verifier)


@dataclass
class SRRConfig:
    initial_samples: int = 4       # M ODE samples per prompt in stage 1 (the worst is refined)
    num_steps: int = 40            # refinement sampler steps
    window: int = 5
    window_starts: tuple = tuple(range(0, 11))
    mix: float = 0.0               # fraction of groups that are SRR in "mixed" mode


@dataclass
class DataConfig:
    world: str = "shapes"          # "shapes" (the embedded default), "jsonl" (your prompts), or module:function
    train_per_task: int = 40       # prompts per task type for training (the paper: 500)
    train_split: str = "unseen"    # "unseen": RL prompts pretraining never saw; "pretrain": pretraining's own prompts
    test_size: int = 256           # held-out prompts (the paper: 1,024)
    seed: int = 0
    train_file: Optional[str] = None  # JSONL in the authors' schema (shapes: instead of synthesizing; jsonl: required)
    test_file: Optional[str] = None   # jsonl world: held-out prompts for evaluation
    quality_per_object: str = "every"  # shapes reward: per-object quality questions as "every" object or the "mean"

    def __post_init__(self):
        if self.train_split not in ("unseen", "pretrain"):
            raise ValueError(f"data.train_split must be 'unseen' or 'pretrain', got {self.train_split!r}")
        if self.quality_per_object not in ("every", "mean"):
            raise ValueError(f"data.quality_per_object must be 'every' or 'mean', got {self.quality_per_object!r}")
        if self.train_per_task < 1 or self.test_size < 0:
            raise ValueError("data.train_per_task must be >= 1 and data.test_size >= 0")


@dataclass
class ParallelConfig:
    """Data-parallel training under ``torchrun`` (docs/distributed.md). Ignored in one process."""
    strategy: str = "replicate"    # "replicate": every rank holds the model, trainable grads all-reduced (DDP
                                   # semantics); "fsdp": FSDP2 fully_shard over policy.shard_modules() and the root
    cpu_offload: bool = False      # fsdp: keep sharded parameters, grads and optimizer state in CPU memory
    param_dtype: str = "auto"      # fsdp on CUDA: dtype of the gathered parameters; "auto": the policy's own (a bf16
                                   # model such as BAGEL computes in bf16); "bfloat16" casts fp32-stored weights for
                                   # compute (needs a bf16-ready forward: TinyUMM's is not); CPU runs never cast
    reduce_dtype: str = "float32"  # dtype gradients are summed in across ranks (both strategies)
    bucket_mb: float = 25.0        # replicate: gradient all-reduce bucket size (MiB), as DDP's bucket_cap_mb
    timeout_s: float = 600.0       # process-group timeout: a rank stuck in a collective this long fails the run

    def __post_init__(self):
        if self.strategy not in ("replicate", "fsdp"):
            raise ValueError(f"parallel.strategy must be 'replicate' or 'fsdp', got {self.strategy!r}")
        if self.param_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"parallel.param_dtype must be auto, float32, bfloat16 or float16, got "
                             f"{self.param_dtype!r}")
        if self.reduce_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"parallel.reduce_dtype must be float32, bfloat16 or float16, got {self.reduce_dtype!r}")
        if not self.bucket_mb > 0 or not self.timeout_s > 0:
            raise ValueError("parallel.bucket_mb and parallel.timeout_s must be positive")


@dataclass
class TrainConfig:
    recipe: str = "tiny_shapes"
    task: str = "rt2i"             # "rt2i", "srr" or "mixed"
    steps: int = 20
    prompts_per_step: int = 8      # P (the paper: 32)
    group_size: int = 8            # G (the paper: 14)
    micro_batch: int = 32          # rollout/replay chunk; rewards of one chunk overlap the next chunk's rollout
    max_think_tokens: int = 48
    think_temperature: float = 1.0
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/train"
    ckpt_every: int = 10
    image_every: int = 10
    rollout_every: int = 0         # save every N-th step's rollout (images, texts, scores) to rollouts/ (0: never)
    eval_size: int = 128
    eval_batch: int = 64
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cfg: CFGConfig = field(default_factory=CFGConfig)      # text-to-image guidance (RECIPE section 2)
    cfg_refine: CFGConfig = field(default_factory=lambda: CFGConfig(text_scale=4.0, image_scale=2.0, low=0.0,
                                                                    high=1.0))   # refinement guidance
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    srr: SRRConfig = field(default_factory=SRRConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.task not in ("rt2i", "srr", "mixed"):
            raise ValueError(f"task must be 'rt2i', 'srr' or 'mixed', got {self.task!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.prompts_per_step < 1 or self.steps < 0 or self.micro_batch < 1:
            raise ValueError("prompts_per_step and micro_batch must be >= 1 and steps >= 0")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_think_tokens < 1 or self.eval_size < 0 or self.eval_batch < 1:
            raise ValueError("max_think_tokens and eval_batch must be >= 1 and eval_size >= 0")
        if self.rollout_every < 0 or self.ckpt_every < 0 or self.image_every < 0:
            raise ValueError("ckpt_every, image_every and rollout_every must be >= 0 (0: never)")
        if self.data.world == "jsonl" and self.reward.verifier == "world":
            raise ValueError("data.world=jsonl has no judge of its own, so reward.verifier=world cannot score it: set "
                             "reward.verifier to a verifier address (http://HOST:PORT, openai:MODEL@URL, "
                             "native:PATH)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


RECIPES: dict[str, Callable[[], TrainConfig]] = {}


def register_recipe(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    RECIPES[fn.__name__] = fn
    return fn


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()


@register_recipe
def tiny_shapes() -> TrainConfig:
    """RT2I GRPO on the shapes world, sized for a 2-core CPU (a few minutes). CPU-forced departures from RECIPE
    section 3, each cutting the step cost: 12 rollout steps (paper: 16) with a 4-step SDE window (paper: 10) starting
    in {0, 1}; 20 ODE steps at evaluation (paper: 40); full fine-tuning at lr 1e-4 (paper: LoRA at 5e-5; at 1e-3
    the shipped checkpoint's rollout reward collapses from 0.82 to 0.25 within 20 steps); 40 steps. The RL prompts are
    40 per task type that pretraining never saw (``data.train_split="unseen"``)."""
    c = TrainConfig(recipe="tiny_shapes", eval_size=192, steps=40)
    c.sampler = SamplerConfig(num_steps=12, window=4, window_starts=(0, 1), eval_steps=20)
    c.cfg_refine = CFGConfig()     # the shipped TinyUMM was pretrained and measured with one guidance for both tasks
    c.optim.lr = 1e-4
    return c


@register_recipe
def tiny_shapes_srr() -> TrainConfig:
    """Self-reflective refinement with FPR on the shapes world (RECIPE section 7); lambda = 0.2 as the code's SRR."""
    c = TrainConfig(recipe="tiny_shapes_srr", task="srr", max_think_tokens=64, eval_size=192)
    c.sampler = SamplerConfig(num_steps=12, window=4, window_starts=(0, 1), eval_steps=20)
    c.srr = SRRConfig(initial_samples=4, num_steps=20, window=5, window_starts=tuple(range(0, 6)))  # paper: 40, [0, 10]
    c.cfg_refine = CFGConfig()     # as tiny_shapes: one guidance for both tasks on the shipped TinyUMM
    c.optim.lr = 1e-4  # as tiny_shapes: the shipped checkpoint is damaged by larger full-fine-tuning steps
    c.loss.text_weight = 0.2
    return c


def _coerce(value: str, current: Any):
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if current is None:
        return None if value.lower() in ("none", "null") else value
    if isinstance(current, tuple):   # comma-separated; integers where the setting holds integers, else names
        items = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
        if current and all(isinstance(x, float) for x in current):      # e.g. optim.betas
            try:
                return tuple(float(v) for v in items)
            except ValueError:
                raise ValueError(f"expected comma-separated numbers, got {value!r}") from None
        numeric = all(isinstance(x, int) and not isinstance(x, bool) for x in current) and len(current) > 0
        if numeric or (items and all(v.lstrip("-").isdigit() for v in items)):
            bad = [v for v in items if not v.lstrip("-").isdigit()]
            if bad:
                raise ValueError(f"expected comma-separated integers, got {value!r}")
            return tuple(int(v) for v in items)
        return tuple(items)
    if isinstance(current, (int, float)):
        try:
            return type(current)(value)
        except ValueError:
            raise ValueError(f"expected a{'n integer' if isinstance(current, int) else ' number'}, got {value!r}") \
                from None
    return type(current)(value)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b=value`` strings (``--set``); unknown keys raise with the valid names. Re-validates."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        obj, parts = cfg, key.strip().split(".")
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise ValueError(f"unknown config section {p!r} in {key!r}")
            obj = getattr(obj, p)
        name = parts[-1]
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            raise ValueError(f"unknown config key {key!r}; valid keys here: {names}")
        try:
            setattr(obj, name, _coerce(value, getattr(obj, name)))
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
    return revalidate(cfg)


def revalidate(cfg):
    """Run every ``__post_init__`` again (after overrides)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            revalidate(v)
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()
    return cfg


def from_dict(d: dict) -> TrainConfig:
    """Rebuild a ``TrainConfig`` from ``to_dict()`` output (checkpoints); unknown keys raise."""
    kinds = {"sampler": SamplerConfig, "cfg": CFGConfig, "cfg_refine": CFGConfig, "loss": LossConfig,
             "optim": OptimConfig, "lora": LoRAConfig, "reward": RewardConfig, "srr": SRRConfig, "data": DataConfig,
             "model": ModelConfig, "parallel": ParallelConfig}
    d = dict(d)
    if "init" in d:                      # configs written before the model section: init was model.path
        d.setdefault("model", {})
        d["model"] = {**d["model"], "path": d.pop("init")}
    kw = {}
    for k, v in d.items():
        if k in kinds:
            sub = {kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()}
            if k == "data":
                sub.setdefault("train_split", "pretrain")  # configs written before the field trained on these
            kw[k] = kinds[k](**sub)
        else:
            kw[k] = v
    return TrainConfig(**kw)


# ---------------------------------------------------------------- Stable Diffusion 3.5 (model.kind=sd3, docs/sd3.md)
# Both train LoRA adapters on a local stable-diffusion-3.5-medium folder (--set model.path=...) on a GPU. Their reward
# is the shapes world's judge until pointed at your prompts and verifier: --set data.world=jsonl
# --set data.train_file=prompts.jsonl --set reward.verifier=http://HOST:PORT (the paper's DVReward on a VLM).

def _sd35m_base(recipe: str) -> TrainConfig:
    c = TrainConfig(recipe=recipe, task="rt2i", device="cuda", steps=1000, ckpt_every=20, image_every=10,
                    eval_size=256, eval_batch=16)
    c.model = ModelConfig(kind="sd3", dtype="bfloat16", options=("resolution=512",))
    c.cfg = CFGConfig(text_scale=4.5, image_scale=1.0, low=0.0, high=1.0, renorm=False)   # Flow-GRPO's guidance
    c.loss.text_weight = 0.0               # flow only: SD3.5 writes no think text
    return c


@register_recipe
def sd35m() -> TrainConfig:
    """AlphaGRPO's RT2I settings on SD3.5-Medium, where they apply to a flow-only model (RECIPE sections 2-6, 8): the
    recipe's grid with 16 steps and a 10-step SDE window starting in {0, 1}, noise 0.7; G = 14, 32 prompts per step;
    image clip 1e-5, advantage clip 5, global-std advantages; AdamW lr 5e-5, weight decay 1e-4; LoRA r32/alpha64 on
    every attention and feed-forward linear (the paper's "every attention/MLP linear"; ``all``: 337 layers, 47.0M);
    bf16. SD3.5's own choices: CFG 4.5 at every step without renorm (no think text to reason with, so no BAGEL
    interval), T5 length 256, 512 px. Gradient checkpointing on: replay of a group of 14 needs about 23 GiB with it
    and 72 GiB without (estimates, not measured)."""
    c = _sd35m_base("sd35m")
    c.prompts_per_step, c.group_size, c.micro_batch = 32, 14, 14
    c.model.max_text_tokens = 256
    c.model.gradient_checkpointing = True
    c.sampler = SamplerConfig(num_steps=16, shift=3.0, noise_level=0.7, window=10, window_starts=(0, 1),
                              eval_steps=40, grid="flow")
    c.loss.clip_image, c.loss.adv_clip, c.loss.adv_std = 1e-5, 5.0, "global"
    c.optim = OptimConfig(lr=5e-5, weight_decay=1e-4)
    c.lora = LoRAConfig(rank=32, alpha=64.0, targets=("all",))
    return c


@register_recipe
def sd35m_flowgrpo() -> TrainConfig:
    """Flow-GRPO's published SD3.5-Medium settings (their ``config/grpo.py:geneval_sd3`` over ``base.py``): the
    pipeline scheduler's grid with 10 steps (``sampler.grid=scheduler``), noise 0.7, the first 9 steps trained (their
    timestep fraction 0.99; their 10th step is stochastic but untrained, ours deterministic); CFG 4.5; G = 24 and 24
    prompts per optimizer step (48 per epoch, two updates); clip 1e-4, advantage clip 5, global std; KL to the base
    0.04 (theirs divides the squared mean gap by 2 std_t^2 without the step's -dt; ours is the exact transition KL,
    so the same beta weighs a step's KL 1/|dt| times more: 4x to 25x on this grid, 13x on average;
    ``loss.beta_image=0.003`` matches theirs on average); AdamW lr 3e-4, weight decay 1e-4; LoRA r32/alpha64
    (Gaussian) on the eight joint-attention projections; T5 length 128; float16 weights (they keep float32 weights
    under float16 autocast). Not reproduced: their EMA of the adapters and the second update from the same
    rollouts."""
    c = _sd35m_base("sd35m_flowgrpo")
    c.prompts_per_step, c.group_size, c.micro_batch = 24, 24, 12
    c.model.dtype, c.model.max_text_tokens = "float16", 128
    c.sampler = SamplerConfig(num_steps=10, shift=3.0, noise_level=0.7, window=9, window_starts=(0,),
                              eval_steps=40, grid="scheduler")
    c.loss.clip_image, c.loss.adv_clip, c.loss.adv_std, c.loss.beta_image = 1e-4, 5.0, "global", 0.04
    c.optim = OptimConfig(lr=3e-4, weight_decay=1e-4)
    c.lora = LoRAConfig(rank=32, alpha=64.0, targets=("joint_attention",))
    return c


# ---------------------------------------------------------------- BAGEL-7B-MoT (model.kind=bagel; docs/bagel.md)
# The paper's setup (RECIPE.md sections 2, 3, 6, 8) on a local BAGEL-7B-MoT folder (--set model.path=...), prompts in
# the authors' JSONL schema (--set data.train_file=...) and a yes/no verifier server (reward.verifier). Step counts
# are the authors': their BAGEL sampler's num_timesteps=16 / 40 are 16 / 40 grid points, i.e. 15 / 39 steps here
# (sampler.num_steps counts steps). Not from the paper (it does not say): steps, max_think_tokens, M.

def _bagel(recipe: str) -> TrainConfig:
    c = TrainConfig(recipe=recipe, steps=200, prompts_per_step=32, group_size=14, micro_batch=14,
                    max_think_tokens=512, device="cuda", ckpt_every=10, image_every=10)
    c.model = ModelConfig(kind="bagel", dtype="bfloat16", gradient_checkpointing=True, attention="auto")
    c.sampler = SamplerConfig(num_steps=15, shift=3.0, noise_level=0.7, window=10, window_starts=(0, 1),
                              eval_steps=39)
    c.cfg = CFGConfig(text_scale=4.0, low=0.4, high=1.0, renorm=True)              # global renorm
    c.cfg_refine = CFGConfig(text_scale=4.0, image_scale=2.0, low=0.0, high=1.0, renorm=True)  # per text channel
    c.lora = LoRAConfig(rank=32, alpha=64.0)
    c.optim = OptimConfig(lr=5e-5, weight_decay=1e-4)
    c.data = DataConfig(world="jsonl")
    c.reward.verifier = "openai:Qwen3-VL-30B-A3B-Instruct@http://127.0.0.1:30000"
    return c


@register_recipe
def bagel_rt2i() -> TrainConfig:
    """RT2I on BAGEL-7B-MoT as the paper ran it: 32 prompts x G = 14, think text then a 16-grid-point (15-step)
    sampler whose first 10 steps (window start 0 or 1) are SDE steps, CFG 4 on (0.4, 1] with the global renorm,
    LoRA r32/alpha64 on every attention and MLP projection of both experts, AdamW 5e-5, lambda = 1 (the code's RT2I
    setting)."""
    return _bagel("bagel_rt2i")


@register_recipe
def bagel_srr() -> TrainConfig:
    """Self-reflective refinement with FPR on BAGEL-7B-MoT: stage 1 keeps the worst of M = 4 ODE samples (40 grid
    points), stage 2 draws 14 refinements with think over 39 steps with a 5-step SDE window starting in [0, 10],
    text CFG 4 and image CFG 2 on [0, 1] with the per-text-channel renorm; lambda = 0.2."""
    c = _bagel("bagel_srr")
    c.task = "srr"
    c.srr = SRRConfig(initial_samples=4, num_steps=39, window=5, window_starts=tuple(range(0, 11)))
    c.loss.text_weight = 0.2
    return c
