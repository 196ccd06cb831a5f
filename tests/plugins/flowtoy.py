"""A flow-only policy and a world defined outside the alphagrpo package, named on the command line as
``model.kind=flowtoy:load_flowtoy`` and ``data.world=flowtoy:toy_world`` (this folder on ``sys.path``). It stands for
a user's own model adapter: it implements the ``Policy`` protocol with ``has_think = False`` (no text path, like
SD3.5), LoRA through ``alphagrpo.models.lora`` and ``reference()`` from ``PolicyBase``."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alphagrpo.models.policy import PolicyBase
from alphagrpo.worlds.base import World

SIZE = 8


class Net(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.words = nn.Embedding(64, dim)
        self.inp = nn.Linear(3 * SIZE * SIZE + 1 + dim, 64)
        self.out = nn.Linear(64, 3 * SIZE * SIZE)

    def forward(self, x, sigma, emb):
        h = torch.cat([x.flatten(1), sigma[:, None], emb], dim=1)
        return self.out(torch.tanh(self.inp(h))).view_as(x)


class FlowToyPolicy(PolicyBase):
    has_think = False
    latent_shape = (3, SIZE, SIZE)

    def __init__(self, net: Net):
        self.net, self.lora = net, None

    def modules_for_lora(self):
        return self.net

    def _embed(self, prompts):
        rows = [torch.tensor([zlib.crc32(w.encode()) % 64 for w in p.split()] or [0]) for p in prompts]
        return torch.stack([self.net.words(r).mean(0) for r in rows])

    def sample_think(self, *a, **k):
        raise AssertionError("a flow-only policy is never asked for think text")

    think_replay = sample_think

    @torch.no_grad()
    def image_condition(self, requests, think, cfg):
        assert think is None, "a flow-only policy gets no think tokens"
        return {"emb": self._embed([r.prompt for r in requests]).detach(), "null": self._embed([""] * len(requests)),
                "cfg": cfg}

    def velocity(self, x, sigma, cond):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        v = self.net(x.float(), s, cond["emb"])
        cfg = cond["cfg"]
        if cfg.text_scale != 1.0 and cfg.low < float(s[0]) <= cfg.high:
            v_u = self.net(x.float(), s, cond["null"])
            v = v_u + cfg.text_scale * (v - v_u)
        return v

    def decode(self, latents):
        return ((latents.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def encode(self, images):
        return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1

    def trainable_parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def enable_lora(self, rank, alpha, targets=(), seed=0):
        from alphagrpo.models.lora import add_lora
        add_lora(self.net, rank, alpha, tuple(targets) or ("inp", "out"), seed=seed)
        self.lora = {"rank": rank, "alpha": alpha, "targets": list(tuple(targets) or ("inp", "out")), "seed": seed}

    def merge_lora(self):
        from alphagrpo.models.lora import merge_lora
        merge_lora(self.net)
        self.lora = None

    def save_pretrained(self, path):
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({"format": "flowtoy/v1", "lora": self.lora}))


def load_flowtoy(model, path, device):
    """``model.kind=flowtoy:load_flowtoy``: a fresh seeded toy (no path) or a saved folder."""
    torch.manual_seed(0)
    pol = FlowToyPolicy(Net())
    if path:
        from safetensors.torch import load_file
        meta = json.loads((Path(path) / "config.json").read_text())
        if meta.get("format") != "flowtoy/v1":
            raise ValueError(f"{path} is not a flowtoy folder")
        if meta["lora"]:
            pol.enable_lora(**meta["lora"])
        pol.net.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return pol


class Brightness:
    """Verifier: "bright?" -> mean brightness."""

    def score(self, images, question_lists):
        return [[float(np.asarray(img, np.float32).mean() / 255)] * len(q) for img, q in zip(images, question_lists)]


def toy_world(data):
    """``data.world=flowtoy:toy_world``: prompts asking for bright images, with a judge."""
    rec = {"prompt": "a bright picture", "semantic_questions": [{"question": "bright?", "tag": "Attribute"}],
           "quality_questions": [{"question": "bright?", "tag": "Aesthetics"}], "task": "bright"}
    return World(train=[dict(rec, prompt=p) for p in ("a bright picture", "light please", "a white field")],
                 test=[rec] * 4, verifier=Brightness(), judge=lambda img, r: float(np.asarray(img).mean()) > 140,
                 name="toy")
