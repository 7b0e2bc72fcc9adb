"""A plain torch.nn reference of the MSD step, for benchmarks only (never imported by msd_jax).

Same architecture as msd_jax.models.vit: pre-norm blocks, fused qkv laid out [3, heads, head_dim],
exact GELU, LayerNorm eps 1e-6, a CLS token (+ its position embedding) prepended to the tokens, final
LayerNorm; DINO head: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised last layer (norm
fixed to 1). Same step as msd_jax.msd.step: G global views at ratio_global and L local views at
ratio_local (random token subsets gathered per example and view), EMA teacher on the global views
without gradient, student on all views (one call for the globals, one for the locals), DINO loss with
centring and sharpening in float32, per-tensor gradient clipping, AdamW (decoupled weight decay, not
on biases / norms / CLS / position embeddings), EMA teacher update, centre update.

Attention uses `F.scaled_dot_product_attention` (what timm's ViT uses); `load_flax_params` copies
the Flax parameters into the modules, so tests can check both compute the same function.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [b, h, n, hd]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Body(nn.Module):
    """tokens [B, n, D] (any order) -> normed tokens [B, 1 + n, D], CLS first."""

    def __init__(self, dim, depth, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.cls_pos_embed = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens):
        cls = (self.cls_token + self.cls_pos_embed).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, num_layers=3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        self.mlp = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        # weight-normalised last layer with g fixed to 1: w = v / ||v|| per output unit
        self.last_layer = nn.Parameter(torch.randn(out_dim, bottleneck_dim) * 0.02)

    def forward(self, x):
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = F.gelu(x)
        x = F.normalize(x, dim=-1, eps=1e-12)
        w = F.normalize(self.last_layer, dim=1, eps=1e-12)
        return x @ w.t()


class Student(nn.Module):
    """Body + one DINO head: tokens -> logits [B, out_dim]."""

    def __init__(self, dim, depth, num_heads, out_dim, mlp_ratio=4.0, head_hidden_dim=2048,
                 head_bottleneck_dim=256, head_layers=3):
        super().__init__()
        self.body = Body(dim, depth, num_heads, mlp_ratio)
        self.head = DINOHead(dim, out_dim, head_hidden_dim, head_bottleneck_dim, head_layers)

    def features(self, tokens):
        return self.body(tokens)[:, 0]

    def forward(self, tokens):
        return self.head(self.features(tokens))

    @classmethod
    def from_vit_config(cls, cfg) -> "Student":
        """From an msd_jax.models.vit.ViTConfig (or anything with the same fields)."""
        return cls(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.out_dim, cfg.mlp_ratio,
                   cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers)


def _t(x):
    return torch.from_numpy(np.array(x, dtype=np.float32))


@torch.no_grad()
def load_flax_params(model: Student, params: dict, head: str = "heads_0") -> Student:
    """Copies msd_jax Student parameters ({'body', 'heads_0'}) into `model` (Dense kernels are
    [in, out], torch Linear weights [out, in])."""
    def dense(lin: nn.Linear, p):
        lin.weight.copy_(_t(p["kernel"]).t())
        lin.bias.copy_(_t(p["bias"]))

    def norm(ln: nn.LayerNorm, p):
        ln.weight.copy_(_t(p["scale"]))
        ln.bias.copy_(_t(p["bias"]))

    body = params["body"]
    model.body.cls_token.copy_(_t(body["cls_token"]))
    model.body.cls_pos_embed.copy_(_t(body["cls_pos_embed"]))
    for i, blk in enumerate(model.body.blocks):
        p = body[f"block{i}"]
        norm(blk.norm1, p["norm1"])
        norm(blk.norm2, p["norm2"])
        dense(blk.attn.qkv, p["attn"]["qkv"])
        dense(blk.attn.proj, p["attn"]["proj"])
        dense(blk.mlp.fc1, p["mlp"]["fc1"])
        dense(blk.mlp.fc2, p["mlp"]["fc2"])
    norm(model.body.norm, body["norm"])
    hp = params[head]
    for i, lin in enumerate(model.head.mlp):
        dense(lin, hp[f"mlp{i}"])
    model.head.last_layer.copy_(_t(hp["last_layer"]).t())
    return model


def is_decay_param(name: str) -> bool:
    """As msd_jax.models.vit.is_decay_param: no decay on biases, norms, CLS, position embeddings."""
    last = name.split(".")[-1]
    if last in ("bias", "cls_token", "cls_pos_embed"):
        return False
    return "norm" not in name.split(".")[-2] if "." in name else True


# ------------------------------------------------------------------------------------------------
# views and loss
# ------------------------------------------------------------------------------------------------
def sample_view_indices(gen: torch.Generator, batch: int, num_tokens: int, num_views: int,
                        size: int) -> torch.Tensor:
    """[B, V, size]: for each example and view, `size` distinct token indices (random permutation)."""
    return torch.rand(batch, num_views, num_tokens, generator=gen).argsort(dim=-1)[..., :size]


def gather_views(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], idx [B, V, k] -> view-major [V * B, k, D]."""
    b, v, k = idx.shape
    d = tokens.shape[-1]
    views = torch.gather(tokens[:, None].expand(b, v, tokens.shape[1], d), 2,
                         idx[..., None].expand(b, v, k, d))
    return views.transpose(0, 1).reshape(v * b, k, d)


def dino_loss(student_logits, teacher_logits, center, student_temp, teacher_temp):
    """student_logits [V, B, K] (first G are the global views), teacher_logits [G, B, K], center [K]:
    mean over (g, v != g) of H(softmax((t_g - c)/T_t), softmax(s_v/T_s)). Returns (loss, t_probs)."""
    g, b, _ = teacher_logits.shape
    v = student_logits.shape[0]
    t = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()
    log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    ce = -torch.einsum("gbk,vbk->gv", t, log_s) / b
    pairs = 1.0 - torch.eye(g, v, dtype=ce.dtype, device=ce.device)
    return (ce * pairs).sum() / pairs.sum(), t


# ------------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------------
class TorchMSDStep:
    """One MSD training step on a token batch [B, N, D]: the work of msd_jax.msd.step.

    Hyperparameters are held constant (the JAX step evaluates its schedules each step; that is a
    handful of scalar operations)."""

    def __init__(self, model: Student, *, num_global, size_global, num_local, size_local,
                 lr=5e-4, weight_decay=0.04, momentum=0.996, student_temp=0.1, teacher_temp=0.04,
                 center_momentum=0.9, clip_grad=3.0, seed=0, device="cpu", amp_dtype=None):
        self.student = model.to(device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.G, self.kg, self.L, self.kl = num_global, size_global, num_local, size_local
        self.momentum, self.clip = momentum, clip_grad
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.center = torch.zeros(model.head.last_layer.shape[0], device=device)
        decay = [p for n, p in self.student.named_parameters() if is_decay_param(n)]
        no_decay = [p for n, p in self.student.named_parameters() if not is_decay_param(n)]
        fused = device != "cpu"
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                     **({"fused": True} if fused else {"foreach": True}))
        self.params = list(self.student.parameters())
        self.teacher_params = list(self.teacher.parameters())
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.device = device
        self.amp_dtype = amp_dtype

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp_dtype)

    def views(self, tokens):
        b, n, _ = tokens.shape
        g_idx = sample_view_indices(self.gen, b, n, self.G, self.kg).to(tokens.device)
        g = gather_views(tokens, g_idx)
        if self.L == 0:
            return g, None
        l_idx = sample_view_indices(self.gen, b, n, self.L, self.kl).to(tokens.device)
        return g, gather_views(tokens, l_idx)

    def step(self, tokens, g_views=None, l_views=None):
        """One step; returns the loss tensor (no host sync). Views may be given (tests)."""
        if g_views is None:
            g_views, l_views = self.views(tokens)
        b = g_views.shape[0] // self.G
        with self._autocast():
            with torch.no_grad():
                t_logits = self.teacher(g_views).float().reshape(self.G, b, -1)
            s_logits = self.student(g_views).float().reshape(self.G, b, -1)
            if l_views is not None:
                s_local = self.student(l_views).float().reshape(self.L, b, -1)
                s_logits = torch.cat([s_logits, s_local], dim=0)
        loss, _ = dino_loss(s_logits, t_logits, self.center, self.student_temp, self.teacher_temp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:  # DINO's per-tensor clipping
            grads = [p.grad for p in self.params]
            norms = torch._foreach_norm(grads)
            scales = [torch.clamp(self.clip / (nrm + 1e-6), max=1.0) for nrm in norms]
            torch._foreach_mul_(grads, scales)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_mul_(self.teacher_params, self.momentum)
            torch._foreach_add_(self.teacher_params, self.params, alpha=1.0 - self.momentum)
            self.center.mul_(self.center_momentum).add_(t_logits.mean(dim=(0, 1)),
                                                        alpha=1.0 - self.center_momentum)
        return loss.detach()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Student", "Body", "DINOHead", "load_flax_params", "dino_loss", "TorchMSDStep",
           "gather_views", "sample_view_indices", "num_params"]
