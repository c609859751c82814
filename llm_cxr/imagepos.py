"""2D position embeddings for the image tokens.

A causal LM sees an image as 256 tokens in a row; its own position scheme (rotary or learned
1D) says where a token is in the *sequence*, not where its code sits in the 16x16 grid, and
the image span starts at a different offset in every prompt. The VQ-GAN's codes are local
textures whose meaning depends on where they are (a bright patch at the costophrenic angle is
an effusion, in the hilum it is not), so a reader must learn position x code interactions.
Measured on the synthetic set: a GPT-NeoX trained to answer yes/no questions from the codes
stays at the majority answer after 800 steps without them and reads cardiomegaly, effusion
and tubes (0.96-0.98) by 1,000 steps with them.

:class:`ImagePositionEmbedding` wraps the model's input embedding: every image token gets
``pos[slot]`` added, where ``slot`` (0 .. H*W-1) is its index inside the span that starts at
the last ``<image>`` token. Slots are derived from the ids, so the model's own forward (training,
prefill, attribution) needs nothing extra; incremental decoding, which feeds one token at a time,
passes the slots explicitly (:meth:`ImagePositionEmbedding.embed`). The table starts as a 2D sine-cosine pattern at the
scale of the embedding rows and is trained with the rest.

Optionally the wrapper also holds a :class:`CodeReader` (config ``image_reader: conv``): a small
CNN over the VQ-GAN codebook vectors of a whole *prompt* image, whose per-slot features are added
to that image's tokens. It gives the LM the locality prior a transformer lacks and must otherwise
learn from scratch: on the synthetic set a 256x6 transformer reading the codes reached finding
micro-F1 0.37 after 200 steps of 12-label supervision, 0.79 with the reader (pretrained for 18 s
as a finding classifier on the same codes, :func:`pretrain_reader`). The reader sees the image all
at once, so it is applied only to images in the prompt: during training :func:`responses` marks
the response tokens (an image the model generates never passes through it, so nothing leaks from
later codes), and at inference a complete ``<image>`` span in the ids is always a prompt image,
since generated codes are fed one at a time with explicit slots.

It lives outside the base model's weights: :func:`save_positions` writes
``image_positions.safetensors`` (table, and reader if any) beside the adapter/weights,
:func:`attach` puts it back on load, and :func:`detached` hides the wrapper while Hugging Face /
peft save the model so that their parameter names stay those of the plain model.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from llm_cxr.errors import ConfigError
from llm_cxr.prompts import PLAN_ITEMS
from llm_cxr.tokens import ImageTokenMap

POSITIONS_FILE = "image_positions.safetensors"


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) sine-cosine table of (row, column), standardised to unit std."""
    quarter = max(1, dim // 4)
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rr, cc = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (rr.reshape(-1), cc.reshape(-1)):
        ang = coord[:, None] * freq[None, :] * (math.pi / 2)
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=1)
    if table.shape[1] < dim:
        table = torch.cat([table, torch.zeros(table.shape[0], dim - table.shape[1])], dim=1)
    table = table[:, :dim]
    return (table - table.mean()) / table.std().clamp(min=1e-6)


def image_slots(ids: torch.Tensor, token_map: ImageTokenMap) -> torch.Tensor:
    """Slot of every image token inside its span (``<image>`` ... ), -1 elsewhere. ids (B, T) -> (B, T)."""
    is_img = (ids >= token_map.first_id) & (ids < token_map.first_id + token_map.n_codes)
    cum = is_img.long().cumsum(-1)
    at_begin = torch.where(ids == token_map.begin_id, cum, torch.zeros_like(cum))
    start = at_begin.cummax(-1).values
    slot = cum - start - 1
    slot = torch.where(is_img, slot % token_map.tokens_per_image, torch.full_like(slot, -1))
    return slot


def conv_trunk(channels: int, width: int, features: int) -> nn.Sequential:
    """Three 3x3 convolutions over a grid of codebook vectors: (N, channels, H, W) -> (N, features, H, W)."""
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.GELU(), nn.Conv2d(width, features, 3, padding=1), nn.GELU())


def code_maps(codebook: torch.Tensor, codes: torch.Tensor, grid: int) -> torch.Tensor:
    """codes (N, H*W) -> their codebook vectors as an image (N, C, H, W)."""
    return codebook[codes.long()].reshape(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


class CodeReader(nn.Module):
    """A CNN over the codebook vectors of a whole image: codes (N, H*W) -> (N, H*W, dim) to add to its tokens.

    With ``summary`` it also gives one (N, dim) vector per image, its features max-pooled over a
    ``regions`` (rows, columns) grid of the image, added to the ``</image>`` token that closes it: what the
    image shows, and roughly where, at one position. Measured on the small preset's stage 0 (1,000 steps,
    teacher-forced checklist over 300 test images): micro-F1 0.35 -> 0.53, mean per-finding AUC 0.80 -> 0.91.
    The same summary added to every token after the image instead was never used (no gap between real and
    swapped images after 1,000 steps)."""

    def __init__(self, codebook: torch.Tensor, grid: int, dim: int, width: int = 64, features: int = 128,
                 summary: bool = False, regions: tuple[int, int] = (3, 2)):
        super().__init__()
        codebook = torch.as_tensor(codebook, dtype=torch.float32)
        self.grid, self.width, self.n_features = grid, width, features
        self.regions = (int(regions[0]), int(regions[1]))
        self.register_buffer("codebook", codebook.detach().clone())
        self.trunk = conv_trunk(codebook.shape[1], width, features)
        self.proj = nn.Linear(features, dim)
        self.sum_proj = nn.Linear(features * self.regions[0] * self.regions[1], dim) if summary else None

    @property
    def config(self) -> dict:
        return {"grid": self.grid, "width": self.width, "features": self.n_features,
                "codebook": list(self.codebook.shape), "dim": self.proj.out_features,
                "summary": self.sum_proj is not None, "regions": list(self.regions)}

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, features, H, W) -> (N, features * rows * columns), max over each region."""
        return nn.functional.adaptive_max_pool2d(maps, self.regions).flatten(1)

    def read(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """codes (N, H*W) -> (per-slot features (N, H*W, dim), summary (N, dim) or None)."""
        maps = self.features(codes)
        slots = self.proj(maps.flatten(2).transpose(1, 2))
        return slots, (self.sum_proj(self.pooled(maps)) if self.sum_proj is not None else None)

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, H*W) -> feature maps (N, features, H, W)."""
        return self.trunk(code_maps(self.codebook, codes, self.grid))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.read(codes)[0]


def pretrain_reader(reader: CodeReader, codes: torch.Tensor, labels: torch.Tensor, epochs: float = 2.0,
                    batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: bool = True,
                    target_std: float | None = None) -> dict:
    """Train the reader's CNN as a multi-label finding classifier (max-pooled features -> one logit per
    label) on ``codes`` (N, H*W) and ``labels`` (N, L) in {1, 0, -1 = unknown, masked}; the head is then
    dropped. ``target_std``: scale ``proj`` so the reader's output starts at that spread (the embedding
    rows'), small next to them but not zero. Returns {"loss": last loss, "steps": n}."""
    from tqdm.auto import tqdm

    if len(codes) == 0:
        raise ConfigError("no training images to pretrain the image reader on")
    device = reader.codebook.device
    head = nn.Linear(reader.n_features, labels.shape[1]).to(device)
    params = list(reader.trunk.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, int(epochs * len(codes) / batch_size))
    known = labels >= 0
    target = labels.clamp(min=0).float()
    loss = torch.tensor(float("nan"))
    reader.train()
    for step in tqdm(range(steps), desc="pretrain image reader", disable=not progress):
        idx = torch.randint(0, len(codes), (batch_size,), generator=gen)
        logits = head(reader.features(codes[idx].to(device)).amax(dim=(2, 3)))
        per = nn.functional.binary_cross_entropy_with_logits(logits, target[idx].to(device), reduction="none")
        m = known[idx].to(device)
        loss = (per * m).sum() / m.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if target_std is not None:
        with torch.no_grad():
            maps = reader.features(codes[:256].to(device))
            for proj, f in ((reader.proj, maps.flatten(2)), (reader.sum_proj, reader.pooled(maps))):
                if proj is None:
                    continue
                rms = float(f.pow(2).mean().sqrt().clamp(min=1e-6))
                nn.init.normal_(proj.weight, std=target_std / (rms * proj.in_features ** 0.5))
                nn.init.zeros_(proj.bias)
    return {"loss": float(loss), "steps": steps}


class ImagePlan(nn.Module):
    """Layout conditioning for an image the model draws: one learned (H*W, rank) map per guide item (a finding,
    bare or with its side: :data:`llm_cxr.prompts.PLAN_ITEMS`), summed over the items a report asks for and
    projected to the embedding width, added to every token of the image being generated.

    A report -> image prompt that lists its findings (``image_guided``) says *what* to draw; which grid slots
    must show it the LM has to work out from attention to a list hundreds of tokens back, and the small
    preset's LM barely did (image finding micro-F1 0.27 with the list, 0.25 without). The plan puts "a left
    effusion belongs here" on the slot itself. Training learns the maps from the images of studies with each
    finding; at inference the same items come from the report (:func:`llm_cxr.prompts.requested_findings`) or
    the caller. The maps start at zero (the plan adds nothing until trained); ``proj`` starts large enough that
    a map entry of ``unit`` gives the embedding rows' spread, so Adam's steps of ~lr move the maps at a useful
    pace."""

    def __init__(self, items, slots: int, dim: int, rank: int = 16, row_std: float = 0.02, unit: float = 0.005):
        super().__init__()
        self.items = tuple(items)
        self.index = {item: i for i, item in enumerate(self.items)}
        self.rank = int(rank)
        self.maps = nn.Parameter(torch.zeros(len(self.items), slots, self.rank))
        self.proj = nn.Linear(self.rank, dim, bias=False)
        nn.init.normal_(self.proj.weight, std=row_std / (unit * self.rank ** 0.5))

    @property
    def config(self) -> dict:
        return {"items": list(self.items), "slots": self.maps.shape[1], "rank": self.rank,
                "dim": self.proj.out_features}

    def grown(self, items) -> ImagePlan:
        """This plan with a map for each of ``items``, whose first items must be this plan's: a plan saved before
        items were added (new ones start at zero, so it draws as before). Itself if it has them all."""
        items = tuple(items)
        if items == self.items:
            return self
        if items[:len(self.items)] != self.items:
            raise ConfigError(f"an image plan for items {', '.join(self.items[:4])}... cannot take the items "
                              f"{', '.join(items[:4])}...: they are not a continuation of its own")
        out = ImagePlan(items, self.maps.shape[1], self.proj.out_features, self.rank)
        with torch.no_grad():  # its maps start at zero
            out.maps[:len(self.items)] = self.maps
            out.proj.weight.copy_(self.proj.weight)
        return out.to(self.maps.device, self.maps.dtype)

    def vector(self, lists) -> torch.Tensor:
        """Guide items per image (lists of ``"name"`` / ``"name:side"``; None or [] = no plan) -> (B, items)
        multi-hot. An item the plan has no map for is an error."""
        out = torch.zeros(len(lists), len(self.items))
        for b, items in enumerate(lists):
            for item in items or ():
                if item not in self.index:
                    raise ConfigError(f"the image plan has no map for {item!r}; it knows {', '.join(self.items)}")
                out[b, self.index[item]] = 1.0
        return out

    def layout(self, plan: torch.Tensor) -> torch.Tensor:
        """plan (B, items) -> (B, H*W, rank): each row's summed maps. A drawing's layout is the same at every
        step, so decoding computes it once (:meth:`ImagePositionEmbedding.embed`'s ``layout``)."""
        return torch.einsum("bp,psr->bsr", plan.to(self.maps.dtype), self.maps)

    def forward(self, layout: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """layout (B, H*W, rank) from :meth:`layout`, slots (B, T) -> (B, T, dim): the layout at the slots (a slot
        < 0 reads slot 0; the caller masks it), picked before the projection so that a decoding step projects one
        slot."""
        return self.proj(layout.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, self.rank)))


class ImagePositionEmbedding(nn.Module):
    """The model's input embedding plus a learned (H*W, d) table added to image tokens, and optionally
    a :class:`CodeReader`'s features added to the tokens of prompt images."""

    def __init__(self, base: nn.Module, token_map: ImageTokenMap, table: torch.Tensor,
                 reader: CodeReader | None = None, plan: ImagePlan | None = None):
        super().__init__()
        self.base = base
        self.token_map = token_map
        self.pos = nn.Parameter(table.detach().clone())
        self.reader = reader
        self.plan = plan
        self._responses: torch.Tensor | None = None  # set by responses(): (B, T) True on response tokens
        self._plan: torch.Tensor | None = None  # set by responses(): (B, items) plan of each row's drawn image

    @property
    def weight(self) -> torch.Tensor:  # what code that reads ``get_input_embeddings().weight`` expects
        return self.base.weight

    def text_row_std(self) -> float:
        """The spread of the text tokens' embedding rows: the scale added features start at."""
        return float(self.base.weight.detach()[:self.token_map.first_id].float().std())

    def embed(self, input_ids: torch.Tensor, slots: torch.Tensor | None = None,
              layout: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``input_ids`` (B, T); ``slots`` (B, T) overrides the slots derived from the ids (tokens
        of an image being generated, fed one at a time); ``layout`` (B, H*W, rank) is the :class:`ImagePlan`'s
        :meth:`~ImagePlan.layout` for those generated tokens (rows of zeros: no plan)."""
        e = self.base(input_ids)
        derived = slots is None
        if derived:
            slots = image_slots(input_ids, self.token_map)
        use = slots >= 0
        if not bool(use.any()):
            return e
        add = self.pos.to(e.dtype)[slots.clamp(min=0)] * use.unsqueeze(-1).to(e.dtype)
        if self.reader is not None and derived:
            add = add + self._read(input_ids, slots, e.dtype)
        drawn = use
        if derived:  # a training forward: only the response's image is drawn, with the plan responses() set
            drawn = use & self._responses if self._responses is not None else None
            layout = None
            if self.plan is not None and self._plan is not None:
                layout = self.plan.layout(self._plan.to(e.device))
        if layout is not None and drawn is not None:
            add = add + self.plan(layout, slots).to(e.dtype) * drawn.unsqueeze(-1).to(e.dtype)
        return e + add

    def _read(self, ids: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Reader features at the slots of every complete prompt image span, and its summary on the
        ``</image>`` that closes it; zeros elsewhere."""
        hw = self.token_map.tokens_per_image
        out = torch.zeros(*ids.shape, self.pos.shape[1], dtype=dtype, device=ids.device)
        spans = []
        ramp = torch.arange(hw, device=ids.device)
        for b, s in (slots == 0).nonzero().tolist():
            if s + hw > ids.shape[1] or not bool((slots[b, s:s + hw] == ramp).all()):
                continue  # an image still being generated (or cut): not a whole prompt image
            if self._responses is not None and bool(self._responses[b, s]):
                continue  # the model's own output: reading it all at once would leak later codes
            spans.append((b, s))
        if not spans:
            return out
        codes = torch.stack([ids[b, s:s + hw] for b, s in spans]) - self.token_map.first_id
        feats, summary = self.reader.read(codes)
        for i, (b, s) in enumerate(spans):
            out[b, s:s + hw] = feats[i].to(dtype)
            if summary is not None and s + hw < ids.shape[1] and int(ids[b, s + hw]) == self.token_map.end_id:
                out[b, s + hw] = summary[i].to(dtype)
        return out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def find(model) -> ImagePositionEmbedding | None:
    """The wrapper on ``model`` (plain, peft or accelerate-wrapped), or None."""
    for m in model.modules():
        if isinstance(m, ImagePositionEmbedding):
            return m
    return None


def _owner(model):
    """The transformers model whose ``set_input_embeddings`` to use (under peft / DDP wrappers)."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def attach(model, token_map: ImageTokenMap, table: torch.Tensor | None = None,
           reader: CodeReader | None = None, plan: ImagePlan | None = None) -> ImagePositionEmbedding:
    """Wrap ``model``'s input embedding (after peft wrapping, if any); ``table`` None = the sin-cos start.
    If the model already has the wrapper, a ``reader`` and a ``plan`` are added to it (where it has none)."""
    owner = _owner(model)
    emb = owner.get_input_embeddings()
    if isinstance(emb, ImagePositionEmbedding):
        if reader is not None and emb.reader is None:
            emb.reader = reader.to(emb.pos.device)
        if plan is not None and emb.plan is None:
            _check_plan(plan, token_map, emb.pos.shape[1])
            emb.plan = plan.to(emb.pos.device)
        return emb
    weight = emb.weight
    if table is None:
        rows = weight.detach()[:token_map.first_id].float()
        table = sincos_2d(token_map.grid_size, weight.shape[1]) * rows.std()
    if tuple(table.shape) != (token_map.tokens_per_image, weight.shape[1]):
        raise ConfigError(f"image position table has shape {tuple(table.shape)}, the model needs "
                          f"({token_map.tokens_per_image}, {weight.shape[1]})")
    if reader is not None and reader.proj.out_features != weight.shape[1]:
        raise ConfigError(f"the image reader gives {reader.proj.out_features}-wide features, the model's "
                          f"embeddings are {weight.shape[1]} wide")
    if plan is not None:
        _check_plan(plan, token_map, weight.shape[1])
    wrapper = ImagePositionEmbedding(emb, token_map, table.to(device=weight.device, dtype=torch.float32),
                                     reader.to(weight.device) if reader is not None else None,
                                     plan.to(weight.device) if plan is not None else None)
    owner.set_input_embeddings(wrapper)
    return wrapper


def _check_plan(plan: ImagePlan, token_map: ImageTokenMap, dim: int) -> None:
    if plan.maps.shape[1] != token_map.tokens_per_image or plan.proj.out_features != dim:
        raise ConfigError(f"the image plan has {plan.maps.shape[1]} slots of width {plan.proj.out_features}, the "
                          f"model needs {token_map.tokens_per_image} of width {dim}")


@contextlib.contextmanager
def responses(model, labels: torch.Tensor | None, plan: torch.Tensor | None = None):
    """While training: mark the response tokens (``labels != -100``) so that the image reader skips
    images the model is learning to generate, and an :class:`ImagePlan` adds ``plan`` (B, items) to them.
    A no-op for models with neither."""
    wrapper = find(model)
    if wrapper is None or (wrapper.reader is None and wrapper.plan is None) or labels is None:
        yield
        return
    wrapper._responses = labels != -100
    wrapper._plan = plan
    try:
        yield
    finally:
        wrapper._responses = None
        wrapper._plan = None


@contextlib.contextmanager
def detached(model):
    """Temporarily put the plain embedding back (saving with transformers/peft); yields the wrapper or None."""
    owner = _owner(model)
    wrapper = owner.get_input_embeddings()
    if not isinstance(wrapper, ImagePositionEmbedding):
        yield None
        return
    owner.set_input_embeddings(wrapper.base)
    try:
        yield wrapper
    finally:
        owner.set_input_embeddings(wrapper)


def save_positions(wrapper: ImagePositionEmbedding, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / POSITIONS_FILE
    tensors = {"pos": wrapper.pos.detach().float().cpu().contiguous()}
    meta = {}
    if wrapper.reader is not None:
        for k, v in wrapper.reader.state_dict().items():
            tensors[f"reader.{k}"] = v.detach().float().cpu().contiguous()
        meta["reader"] = json.dumps(wrapper.reader.config)
    if wrapper.plan is not None:
        for k, v in wrapper.plan.state_dict().items():
            tensors[f"plan.{k}"] = v.detach().float().cpu().contiguous()
        meta["plan"] = json.dumps(wrapper.plan.config)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_positions(folder: str | Path) -> tuple[torch.Tensor, CodeReader | None, ImagePlan | None] | None:
    """(table, reader or None, plan or None) saved with a run, or None if the run has no image position
    embeddings."""
    from safetensors import safe_open

    path = Path(folder) / POSITIONS_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        reader = None
        if "reader" in meta:
            cfg = json.loads(meta["reader"])
            state = {k[len("reader."):]: v for k, v in tensors.items() if k.startswith("reader.")}
            reader = CodeReader(state["codebook"], cfg["grid"], cfg["dim"], cfg["width"], cfg["features"],
                                summary=cfg.get("summary", False), regions=tuple(cfg.get("regions", (3, 2))))
            reader.load_state_dict(state)
        plan = None
        if "plan" in meta:
            cfg = json.loads(meta["plan"])
            plan = ImagePlan(cfg["items"], cfg["slots"], cfg["dim"], cfg["rank"])
            plan.load_state_dict({k[len("plan."):]: v for k, v in tensors.items() if k.startswith("plan.")})
            plan = plan.grown(PLAN_ITEMS)  # a plan saved with fewer items takes today's, new ones at zero
        return tensors["pos"], reader, plan
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path} is not a valid image position table: {e}") from e


__all__ = ["CodeReader", "ImagePlan", "ImagePositionEmbedding", "POSITIONS_FILE", "attach", "code_maps", "conv_trunk",
           "detached", "find", "image_slots", "load_positions", "pretrain_reader", "responses", "save_positions",
           "sincos_2d"]
