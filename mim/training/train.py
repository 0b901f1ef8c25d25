"""Train the MIM model (DML baseline, 3-tower or 4-tower) on a catalog.

    mimsearch train --catalog artifacts/catalog --objective 3tower --out artifacts/checkpoints/3tower
    mimsearch train ... --objective 4tower --init-from artifacts/checkpoints/3tower   # paper's best 4-tower
    mimsearch train ... --resume                                                      # continue a run

CPU by default here, the GPU when one is present. Seeded: the batch at step i depends only on (seed, i), so a
resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mim.checks import is_positive_int
from mim.data.catalog import ATTRIBUTES, Catalog
from mim.data.dataset import open_catalog
from mim.errors import TrainingError
from mim.model import checkpoint as ckpt
from mim.model.config import PreprocessConfig, get_size
from mim.model.losses import OBJECTIVES, LossWeights, mim_loss
from mim.model.preprocess import preprocess_image_bytes
from mim.model.tokenizer import ClipTokenizer, TextTokenizer, Tokenizers
from mim.model.towers import MIMModel
from mim.progress import progress_bar

# Batch composition defaults (docs/METHOD.md, "Batches"): products without street photos per batch for the
# photo-title term, and hard-negative groups.
DEFAULT_CATALOG_ROWS = 32
DEFAULT_HARD_NEGATIVES = False
DEFAULT_ALIGN_WEIGHT = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that shapes what one training run learns: the one owner of these names and defaults.

    A checkpoint records `asdict(config)` in its meta (`meta_of`); `from_meta` reads it back, and a setting a
    checkpoint predates takes its default here (what the run was trained with before the setting existed).
    Where the data comes from (catalog, initial weights) and how the run is executed (device, saving, progress)
    are not settings: `train` takes them beside the config."""

    objective: str = "3tower"  # dml | 3tower | 4tower (mim.model.losses.OBJECTIVES)
    size: str = "tiny"  # named tower size of a fresh model (mim.model.config.SIZES); a start checkpoint's wins
    steps: int = 600
    batch_size: int = 64  # street-to-shop pairs per batch
    catalog_rows: int = DEFAULT_CATALOG_ROWS  # title-only products per batch (photo-title term)
    hard_negatives: bool = DEFAULT_HARD_NEGATIVES  # batches of look-alikes of other categories
    align_weight: float = DEFAULT_ALIGN_WEIGHT  # every image-text term, next to the image-image term's 1.0
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50  # linear warm-up steps before the cosine decay
    # The learning-rate schedule (warm-up, then cosine decay to 0) runs over `schedule_steps` (0: over `steps`), and
    # this run's first step is its step `schedule_start`. A run that continues another's schedule (the second half
    # of one warm-up and one decay, e.g. a 4-tower stage after a 3-tower stage) sets both; it also takes over the
    # optimizer state of the checkpoint it starts from, so the two stages are one run that changes objective.
    schedule_steps: int = 0
    schedule_start: int = 0
    seed: int = 0  # model initialisation and every batch (the batch at step i depends on (seed, i) only)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise TrainingError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise TrainingError(f"{name}={value!r}; expected a positive int")
        if not all(isinstance(v, int) and v >= 0 for v in (self.schedule_start, self.schedule_steps)):
            raise TrainingError(
                f"schedule_start={self.schedule_start!r}, schedule_steps={self.schedule_steps!r}; expected ints >= 0"
            )
        if self.schedule_start + self.steps > self.schedule_total:
            raise TrainingError(
                f"steps {self.steps} from schedule step {self.schedule_start} run past the schedule's "
                f"{self.schedule_total} steps; expected schedule_start + steps <= schedule_steps"
            )

    @property
    def schedule_total(self) -> int:
        """Steps of the whole learning-rate schedule this run is part of."""
        return self.schedule_steps or self.steps

    def continues_schedule(self) -> bool:
        """True for the later stage of a schedule another run started (no warm-up of its own)."""
        return self.schedule_start > 0

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainConfig:
        """The config a checkpoint's meta records (settings it predates take their defaults)."""
        return cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Setting -> (this value, the other's), for every setting that differs."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }


@dataclass
class TrainData:
    """A split's images preprocessed once into arrays (the tiny size fits in memory many times over).

    Every product of the split is a row (its catalog photo and title); `paired` lists the rows that also have
    street photos. Image-image terms use only those; image-title terms may use every row."""

    product_ids: list[int]
    product_pixels: np.ndarray  # (P, 3, S, S)
    titles: list[str]
    query_pixels: np.ndarray  # (Q, 3, S, S)
    query_texts: list[str]
    queries_of: list[np.ndarray]  # per product row: indices into query_pixels (empty for unpaired rows)
    paired: np.ndarray  # (P_paired,) rows with at least one street photo
    unpaired: np.ndarray  # the other rows: catalog photo and title only
    attributes: np.ndarray  # (P, 3) int codes of (category, pattern, colour), for composing batches


def load_split(catalog: Catalog, split: str, pre: PreprocessConfig, progress: bool = True) -> TrainData:
    products = catalog.products_in(split)
    row = {p.product_id: i for i, p in enumerate(products)}
    queries = [q for q in catalog.queries_in(split) if q.product_id in row]
    if not queries:
        raise TrainingError(f"the {split} split of the catalog at {catalog.root} has no query photos to train on")
    it = progress_bar(products + queries, desc=f"preprocess {split}", enabled=progress, leave=False)
    arrays = [preprocess_image_bytes(catalog.read_bytes(x.image), pre) for x in it]
    qof: list[list[int]] = [[] for _ in products]
    for j, q in enumerate(queries):
        qof[row[q.product_id]].append(j)
    codes = [{v: i for i, v in enumerate(sorted({getattr(p, a) for p in products}))} for a in ATTRIBUTES]
    return TrainData(
        product_ids=[p.product_id for p in products],
        product_pixels=np.stack(arrays[: len(products)]),
        titles=[p.title for p in products],
        query_pixels=np.stack(arrays[len(products) :]),
        query_texts=[q.short_text for q in queries],
        queries_of=[np.asarray(x, dtype=np.int64) for x in qof],
        paired=np.array([i for i, x in enumerate(qof) if x], dtype=np.int64),
        unpaired=np.array([i for i, x in enumerate(qof) if not x], dtype=np.int64),
        attributes=np.array([[c[getattr(p, a)] for c, a in zip(codes, ATTRIBUTES)] for p in products], dtype=np.int64),
    )


HARD_GROUP = 4  # rows per hard-negative group: an anchor and up to 3 look-alikes of other categories


def compose_batch(
    rng: np.random.Generator, pool: np.ndarray, attributes: np.ndarray, size: int, hard: bool
) -> np.ndarray:
    """`size` distinct rows of `pool`, drawn from `rng`.

    Random rows, or with `hard` groups of HARD_GROUP: a random anchor, then rows that share its pattern (or, half
    the time, its colour) but are of another category. In-batch negatives then look like the positive on the cues
    a distractor shares, so only the category (shape) tells them apart."""
    if size > len(pool):
        raise TrainingError(
            f"a batch of {size} distinct rows needs at least {size} products; the pool holds {len(pool)}"
        )
    if not hard:
        return rng.choice(pool, size=size, replace=False)
    attrs = attributes[pool]  # (N, 3)
    free = np.ones(len(pool), dtype=bool)
    chosen: list[int] = []
    for anchor in rng.permutation(len(pool)):
        if len(chosen) == size:
            break
        if not free[anchor]:
            continue
        free[anchor] = False
        chosen.append(anchor)
        shared = 1 if rng.random() < 0.5 else 2  # column of pattern or colour
        alike = np.flatnonzero(free & (attrs[:, shared] == attrs[anchor, shared]) & (attrs[:, 0] != attrs[anchor, 0]))
        take = min(HARD_GROUP - 1, size - len(chosen), len(alike))
        if take:
            picked = rng.choice(alike, size=take, replace=False)
            free[picked] = False
            chosen.extend(int(x) for x in picked)
    return pool[np.asarray(chosen, dtype=np.int64)]


def tokenizer_texts(catalog: Catalog) -> list[str]:
    """Training split text only: test titles are never seen, and their words still tokenize (word pieces)."""
    texts = [p.title for p in catalog.products_in("train")]
    texts += [q.short_text for q in catalog.queries_in("train")]
    texts += [r.text for r in catalog.reformulations_in("train")]
    return texts


def augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flip, scale, shift and rotation of a batch of street photos (B, 3, S, S), drawn from `rng`.

    Each product has only a few fixed street photos; without this the towers memorise those photos instead of
    learning what the product is. The catalog photo is never augmented: it is what the gallery holds."""
    b = len(pixels)
    scale = rng.uniform(0.8, 1.15, b)  # > 1 zooms out (the frame shows more), < 1 zooms in
    angle = rng.uniform(-0.25, 0.25, b)  # radians, about +-15 degrees
    flip = np.where(rng.random(b) < 0.5, -1.0, 1.0)
    shift = rng.uniform(-0.12, 0.12, (b, 2))  # fraction of half the frame
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    theta = np.stack([np.stack([cos * flip, -sin, shift[:, 0]], 1), np.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    grid = torch.nn.functional.affine_grid(
        torch.from_numpy(theta.astype(np.float32)), list(x.shape), align_corners=False
    )
    # Border padding repeats the photo's own edge: the street photos have no white margin to invent.
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).numpy()


def batch_loss(
    model: MIMModel,
    tok: Tokenizers,
    data: TrainData,
    objective: str,
    rng: np.random.Generator,
    batch_size: int,
    weights: LossWeights | None = None,
    catalog_rows: int = 0,
    hard_negatives: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Draw one batch and return the objective's loss on it.

    The batch holds `batch_size` distinct paired products (a street photo, the catalog photo, the title and a short
    query each) and, for objectives with titles, up to `catalog_rows` unpaired products (catalog photo and title
    only), which only the photo-title term sees. `hard_negatives` composes both parts with compose_batch."""
    dev = next(model.parameters()).device
    rows = compose_batch(rng, data.paired, data.attributes, batch_size, hard_negatives)
    qidx = np.array([rng.choice(data.queries_of[r]) for r in rows])
    q_pix = torch.from_numpy(augment(data.query_pixels[qidx], rng))
    # Drawn last, so the pairs of a step do not depend on catalog_rows.
    extra = np.zeros(0, dtype=np.int64)
    if objective != "dml" and catalog_rows and len(data.unpaired):
        extra = compose_batch(
            rng, data.unpaired, data.attributes, min(catalog_rows, len(data.unpaired)), hard_negatives
        )
    all_rows = np.concatenate([rows, extra])
    pixels = torch.cat([q_pix, torch.from_numpy(data.product_pixels[all_rows])]).to(dev)
    pids = [data.product_ids[r] for r in all_rows]
    titles = [data.titles[r] for r in all_rows]
    shorts = [data.query_texts[i] for i in qidx]
    imgs = model.encode_image(pixels)  # query photos and catalog photos through the one image encoder
    q, p = imgs[:batch_size], imgs[batch_size:]
    t = s = None
    if objective != "dml":
        texts = titles + (shorts if objective == "4tower" else [])
        ids, mask = tok.encode_batch(texts)
        emb = model.encode_text(torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev))  # one text encoder
        t = emb[: len(titles)]
        s = emb[len(titles) :] if objective == "4tower" else None
    return mim_loss(objective, model.scale(), q, p, t, s, pids, titles, shorts, weights or LossWeights())


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda asked for, but torch sees no CUDA device; use --device cpu (or auto)")
    return torch.device(name)


def check_out_dir(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds files unless asked: `resume` continues the checkpoint there,
    `overwrite` trains from scratch over it. Nothing is written either way."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"--out {out_dir} is a file; expected a checkpoint folder (new, empty or to resume)")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if resume and not (out_dir / ckpt.CONFIG).is_file():
        raise TrainingError(f"--resume: {out_dir} holds files but no checkpoint ({ckpt.CONFIG}); give another --out")
    if not resume and not overwrite:
        raise TrainingError(
            f"--out {out_dir} is not empty; expected a new or empty folder: add --resume to continue its "
            "checkpoint, --overwrite to train from scratch over it, or give another --out"
        )


def train(
    config: TrainConfig,
    *,
    catalog: str | Path,
    out: str | Path,
    init_from: str | Path | None = None,
    resume: bool = False,
    save_every: int = 200,
    device: str = "auto",
    progress: bool = True,
    eval_every: int = 0,
    on_eval: Callable[[int, MIMModel, TextTokenizer], None] | None = None,
) -> Path:
    """Train `config` on `catalog` (a catalog folder or a dataset manifest; never generated here) and checkpoint
    into `out` every `save_every` steps and at the end; returns `out`. `init_from` starts from a checkpoint's
    weights, tokenizer and preprocessing; `resume` continues the run saved in `out`. With `eval_every` and
    `on_eval`, calls on_eval(step, model, tokenizer) (model in eval mode, no grad) after every eval_every-th step
    and the last, for learning curves."""
    c = config
    objective, steps, batch_size, lr = c.objective, c.steps, c.batch_size, c.lr
    dev = pick_device(device)
    torch.manual_seed(c.seed)
    cat_path = Path(catalog)
    # Never generated here: a mistyped path of one's own dataset must not train on toy products (`mimsearch catalog`).
    cat = open_catalog(cat_path)
    out_dir = Path(out)

    start_step = 0
    if resume and (out_dir / ckpt.CONFIG).is_file():
        state = ckpt.load_checkpoint(out_dir)
        if state.meta.get("objective") != objective:
            raise TrainingError(
                f"--resume: {out_dir} was trained with objective {state.meta.get('objective')!r}, not {objective!r}"
            )
        model, pre, tok = state.model, state.pre_cfg, state.tokenizer
        start_step = int(state.meta.get("step", 0))
    elif init_from:
        state = ckpt.load_checkpoint(init_from)
        model, pre, tok = state.model, state.pre_cfg, state.tokenizer
    elif c.continues_schedule():
        raise TrainingError(
            f"schedule_start={c.schedule_start} continues another run's schedule; expected init_from "
            "(--init-from), the checkpoint of that run"
        )
    else:
        spec = get_size(c.size)
        pre = spec.preprocess
        if pre.tokenizer == "clip_bpe":  # a CLIP shape from scratch: CLIP's own vocabulary
            tok = ClipTokenizer.bundled(pre.context_length)
        else:
            tok = TextTokenizer.train(
                tokenizer_texts(cat),
                vocab_size=spec.model.text.vocab_size,
                context_length=pre.context_length,
                lowercase=pre.lowercase,
            )
        model = MIMModel(spec.model.with_vocab(tok.vocab_size))
    model.to(dev).train()

    data = load_split(cat, "train", pre, progress)
    n_pairs = len(data.paired)
    if batch_size > n_pairs:
        raise TrainingError(
            f"--batch-size {batch_size} is larger than the {n_pairs} training products with street photos; "
            f"expected at most {n_pairs}: lower it"
        )

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    if start_step:
        ckpt.load_train_state(out_dir, model, opt)
    elif init_from and c.continues_schedule():
        ckpt.load_train_state(Path(init_from), model, opt)  # the moments of the stage this one continues

    meta = {
        **asdict(c),
        "catalog": str(cat.root),
        "catalog_seed": cat.seed,
        "init_from": str(init_from) if init_from else None,
    }
    weights = LossWeights.uniform(c.align_weight)
    bar = progress_bar(
        range(start_step, steps), desc=f"train {objective}", enabled=progress, initial=start_step, total=steps
    )
    t0, last = time.time(), {}
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(c.schedule_start + step, c.schedule_total, lr, c.warmup)
        # Counted along the schedule: a stage that continues another draws the batches the one run would have.
        step_rng = np.random.default_rng([c.seed, c.schedule_start + step])
        loss, parts = batch_loss(
            model, tok, data, objective, step_rng, batch_size, weights, c.catalog_rows, c.hard_negatives
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = {"loss": float(loss.detach()), **parts}
        bar.set_postfix(loss=f"{last['loss']:.3f}", scale=f"{float(model.scale().detach()):.1f}")
        done = step + 1
        if on_eval is not None and eval_every and (done % eval_every == 0 or done == steps):
            model.eval()
            with torch.inference_mode():
                on_eval(done, model, tok)
            model.train()
        if done % save_every == 0 or done == steps:
            model.eval()
            ckpt.save_checkpoint(out_dir, model, pre, tok, {**meta, "step": done, "last_loss": last}, opt)
            model.train()
    if start_step >= steps:
        print(f"{out_dir}: already trained for {start_step} steps; nothing to do", file=sys.stderr)
    else:
        print(
            f"trained {objective} for {steps - start_step} steps in {time.time() - t0:.0f}s -> {out_dir} "
            f"(last loss {last.get('loss', float('nan')):.3f})",
            file=sys.stderr,
        )
    return out_dir
