"""M2IB: multi-modal information bottleneck attribution (Wang, Rudner, Wilson, NeurIPS 2023), for a generative LM.

At one block's input, the hidden states of the attributed positions (an image's codes, or a report's tokens) pass
through a bottleneck: a learned per-position, per-feature keep rate lambda = sigmoid(alpha) keeps lambda * h and
replaces the rest with noise, z = lambda * h + (1 - lambda) * eps, eps ~ N(0, 1). The loss is
beta * KL(q(z|h) || N(0, 1)), averaged, minus a fitting term that keeps what the *other* modality needs: here the mean
log-likelihood of the target (a report sentence given the image, or the drawn codes given the report), with
no labels. The attribution of a position is its KL summed over features: how much of it the target needs.

M2IB's public code (CLIP) uses the block at layer 9 of 12, beta 0.1, alpha starting at 5, Adam with lr 1,
10 steps of 10 noise samples, and the features as they are. IBA (Schulz et al., ICLR 2020) first standardises them
with their mean and std (so that the noise has the features' scale): ``normalize=True`` does that, with the
statistics of the attributed positions themselves. The blocks below the bottleneck are computed once per
explanation (:func:`llm_cxr.explain.tail.upper_layers`), not at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_cxr.errors import ConfigError
from llm_cxr.explain.tail import hidden_at, hooks, n_layers, replace_input, tail_logits, tail_matches


def capacity(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, 1)) per element, as IBA and M2IB compute it."""
    return -0.5 * (1 + torch.log(var) - mu ** 2 - var)


@dataclass
class M2IBSettings:
    layer: float = 0.75  # the bottleneck's block: an index, or a fraction of the depth (M2IB: 9 of 12)
    beta: float = 0.1
    steps: int = 10
    lr: float = 1.0
    samples: int = 10
    alpha: float = 5.0
    normalize: bool = False
    naive: bool = False  # recompute the blocks below the bottleneck at every step (to measure the saving)
    seed: int = 0

    def block(self, depth: int) -> int:
        if self.layer < 1 and isinstance(self.layer, float):
            return min(depth - 1, max(0, round(self.layer * depth)))
        if not 0 <= int(self.layer) < depth:
            raise ConfigError(f"m2ib layer {self.layer} is out of range: the model has {depth} blocks")
        return int(self.layer)


def fitting(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood of the target tokens: logits (N, T, V), ids (1, T), target (T-1,) weights -> (N,)."""
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:].expand(len(logits), -1)[..., None])[..., 0]
    w = target.to(lp)
    return (lp * w).sum(1) / w.sum().clamp_min(1e-9)


def bottleneck(x: torch.Tensor, fit, s: M2IBSettings) -> torch.Tensor:
    """Optimise a bottleneck on ``x`` (S, D) for ``s.steps`` Adam steps: each samples ``s.samples`` noisy copies
    z (N, S, D) and minimises beta * mean KL - mean ``fit(z)`` (N,). Returns the KL per position, summed over features,
    from the last step's forward (as M2IB's code reads its buffer)."""
    mean, std = _scale(x, s)
    alpha = torch.nn.Parameter(torch.full_like(x, s.alpha))
    opt = torch.optim.Adam([alpha], lr=s.lr)
    gen = torch.Generator(device=x.device).manual_seed(s.seed)
    kl = torch.zeros_like(x)
    for _ in range(s.steps):
        lam = torch.sigmoid(alpha)
        mu, var = (x - mean) / std * lam, (1 - lam) ** 2
        kl = capacity(mu, var)
        eps = torch.randn((s.samples, *x.shape), generator=gen, device=x.device)
        z = (mu + var.sqrt() * eps) * std + mean  # (N, S, D)
        loss = s.beta * kl.mean() - fit(z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return kl.detach().sum(-1).cpu()


def m2ib(cxr, case, settings: M2IBSettings | None = None) -> torch.Tensor:
    """(S,) attribution of the case's source positions: each one's KL, summed over features, at the end."""
    s = settings or M2IBSettings()
    x, fit = _fitting_term(cxr, case, s)
    return bottleneck(x, fit, s)


@torch.no_grad()
def without_information(cxr, case, settings: M2IBSettings | None = None) -> float:
    """The target's mean log-likelihood when the source positions carry no information at the bottleneck's block:
    their hidden states replaced by the bottleneck's noise (lambda = 0, as M2IB's prior), averaged over samples."""
    s = settings or M2IBSettings()
    x, fit = _fitting_term(cxr, case, s)
    mean, std = _scale(x, s)
    gen = torch.Generator(device=x.device).manual_seed(s.seed)
    return float(fit(torch.randn((s.samples, *x.shape), generator=gen, device=x.device) * std + mean).mean())


def _fitting_term(cxr, case, s: M2IBSettings):
    """(the source positions' hidden states at the bottleneck's block (S, D), ``fit``: z (N, S, D) -> the target's
    mean log-likelihood (N,) with z in their place). The blocks below run once, here."""
    layer = s.block(n_layers(cxr.lm))
    batch = case.batch()
    with torch.no_grad():
        h = hidden_at(cxr, batch, layer).detach().float()  # (1, T, D): once per explanation
    src = case.sources.to(h.device)
    use_tail = not s.naive and _tail_works(cxr, batch, layer)
    ids, target = case.ids.to(h.device), case.target.to(h.device)

    def fit(z: torch.Tensor) -> torch.Tensor:
        hidden = h.expand(len(z), -1, -1).clone()
        hidden[:, src] = z
        if use_tail:
            logits = tail_logits(cxr, batch, hidden.to(cxr.lm.dtype), layer)
        else:
            logits = _full_logits(cxr, batch, hidden, src, layer)
        return fitting(logits, ids, target)

    return h[0, src], fit


def _scale(x: torch.Tensor, s: M2IBSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The features' mean and std the noise takes (IBA's normalisation), or 0 and 1 (M2IB's)."""
    if s.normalize:
        return x.mean(0), x.std(0).clamp_min(1e-5)
    return torch.zeros_like(x[0]), torch.ones_like(x[0])


def _tail_works(cxr, batch, layer: int) -> bool:
    """Whether the upper-blocks shortcut reproduces this model's forward at ``layer``: a property of its
    architecture, so checked once per model and layer (the check costs three forwards), not per explanation."""
    checked = cxr.__dict__.setdefault("_tail_checked", {})
    if layer not in checked:
        checked[layer] = tail_matches(cxr, batch, layer)
    return checked[layer]


def _full_logits(cxr, batch, hidden: torch.Tensor, src: torch.Tensor, layer: int) -> torch.Tensor:
    """The naive form: the whole forward of ``N`` copies, block ``layer``'s input replaced at ``src``."""
    n = hidden.shape[0]
    z = hidden[:, src]

    def swap(h):
        h = h.clone()
        h[:, src] = z.to(h.dtype)
        return h

    ids = batch.input_ids.expand(n, -1)
    image = batch.image.rows(torch.zeros(n, dtype=torch.long)) if batch.image is not None else None
    with hooks(replace_input(cxr.lm, layer, swap)):
        return cxr(ids, batch.attention_mask.expand(n, -1), image).logits


__all__ = ["M2IBSettings", "bottleneck", "capacity", "fitting", "m2ib", "without_information"]
