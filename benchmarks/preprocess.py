"""Image preprocessing with and without JPEG draft decoding: the embedding gate and the throughput ratio.

    python -m benchmarks.preprocess --checkpoint artifacts/checkpoints/3tower --catalog artifacts/catalog \\
        --out benchmarks/results/preprocess/tiny
    python -m benchmarks.preprocess --size base --out benchmarks/results/preprocess/base   # 224 px, random init

Photos: the colour photographs that scikit-image ships (`skimage.data`: astronaut, coffee, chelsea, rocket),
each re-encoded as a JPEG (quality 90) at its own size and upscaled to each of `--megapixels`, plus the
catalog's street photos (JPEG) when `--catalog` is given. Query photos from phones are 1-12 MP JPEGs.

1. Gate: every photo is preprocessed with full decoding and with draft decoding, both are embedded by the
   checkpoint's image tower, and the cosine between the two embeddings must be >= GATE_MIN_COSINE for every
   photo (pixel differences are reported too). A run that misses the gate exits 1.
2. Throughput: `preprocess_image_bytes` images/s per photo size, full vs draft, timed side by side
   (interleaved rounds on the same photos), and their ratio.

Writes `preprocess.csv` and `preprocess.json` into `--out` and prints a table last.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mim.commandline import CommandParser
from mim.model.config import PreprocessConfig
from mim.model.preprocess import JPEG_DRAFT_MARGIN, preprocess_image_bytes
from mim.search.ranking import parity

from .common import hardware, markdown_table, now_utc, versions, write_json, write_rows_csv

GATE_MIN_COSINE = 0.999
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DEFAULT_MEGAPIXELS = (1.0, 3.0, 12.0)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Photo:
    name: str
    size: tuple[int, int]  # (width, height)
    data: bytes  # JPEG

    @property
    def megapixels(self) -> float:
        return self.size[0] * self.size[1] / 1e6


def jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def skimage_photos(
    megapixels: Sequence[float] = DEFAULT_MEGAPIXELS, names: Sequence[str] = SKIMAGE_PHOTOS
) -> list[Photo]:
    """Each photo at its own size and upscaled (Lanczos) to each size in `megapixels`, as JPEGs."""
    from skimage import data

    out = []
    for name in names:
        img = Image.fromarray(getattr(data, name)())
        out.append(Photo(f"{name}@native", img.size, jpeg(img)))
        for mp in megapixels:
            k = (mp * 1e6 / (img.width * img.height)) ** 0.5
            big = img.resize((round(img.width * k), round(img.height * k)), Image.LANCZOS)
            out.append(Photo(f"{name}@{mp:g}MP", big.size, jpeg(big)))
    return out


def catalog_photos(catalog_dir: Path, n: int) -> list[Photo]:
    """Up to `n` street photos (JPEG) of a catalog, in file order."""
    paths = sorted((Path(catalog_dir) / "street").glob("*.jpg"))[:n]
    out = []
    for p in paths:
        data = p.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            out.append(Photo(f"catalog/{p.name}", im.size, data))
    return out


def gate(photos: Sequence[Photo], cfg: PreprocessConfig, embed: Callable[[np.ndarray], np.ndarray]) -> list[dict]:
    """One row per photo: cosine between the embeddings of the full and the draft decoding, pixel differences."""
    rows = []
    for p in photos:
        full = preprocess_image_bytes(p.data, cfg, draft=False)
        fast = preprocess_image_bytes(p.data, cfg, draft=True)
        e = embed(np.stack([full, fast]))
        cos = parity(e[1:], e[:1]).min_cosine
        diff = np.abs(full - fast)
        rows.append(
            {
                "photo": p.name,
                "width": p.size[0],
                "height": p.size[1],
                "cosine": cos,
                "pixel_max_abs": float(diff.max()),
                "pixel_mean_abs": float(diff.mean()),
            }
        )
    return rows


def throughput(photos: Sequence[Photo], cfg: PreprocessConfig, min_time: float = 1.0) -> dict[str, float]:
    """images/s of full and draft decoding on the same photos, in alternating rounds until each side has run
    for `min_time` seconds (load on the machine hits both sides alike)."""
    spent = {"full": 0.0, "draft": 0.0}
    count = {"full": 0, "draft": 0}
    while min(spent.values()) < min_time:
        for side, draft in (("full", False), ("draft", True)):
            t0 = time.perf_counter()
            for p in photos:
                preprocess_image_bytes(p.data, cfg, draft=draft)
            spent[side] += time.perf_counter() - t0
            count[side] += len(photos)
    return {side: count[side] / spent[side] for side in spent}


def throughput_rows(photos: Sequence[Photo], cfg: PreprocessConfig, min_time: float) -> list[dict]:
    """One row per size group (the photos sharing a name suffix: native, 1MP, ...)."""
    groups: dict[str, list[Photo]] = {}
    for p in photos:
        groups.setdefault(p.name.split("@")[-1] if "@" in p.name else "catalog", []).append(p)
    rows = []
    for label, group in groups.items():
        ips = throughput(group, cfg, min_time)
        rows.append(
            {
                "size": label,
                "photos": len(group),
                "mean_megapixels": float(np.mean([p.megapixels for p in group])),
                "full_images_per_s": ips["full"],
                "draft_images_per_s": ips["draft"],
                "ratio": ips["draft"] / ips["full"],
            }
        )
    return rows


def checkpoint_embedder(ckpt_dir: Path) -> tuple[PreprocessConfig, Callable[[np.ndarray], np.ndarray]]:
    import torch

    from mim.model.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_dir)

    @torch.no_grad()
    def embed(pixels: np.ndarray) -> np.ndarray:
        return ck.model.encode_image(torch.from_numpy(pixels)).numpy()

    return ck.pre_cfg, embed


def random_embedder(size: str, seed: int = 0) -> tuple[PreprocessConfig, Callable[[np.ndarray], np.ndarray]]:
    """A random-init image tower of a named size (mim.model.config.SIZES): the gate at a size no checkpoint has yet
    (`base`, 224 px). Random weights respond to pixel detail too, so the gate still means something."""
    import torch

    from mim.model.config import get_size
    from mim.model.towers import ImageTower

    spec = get_size(size)
    torch.manual_seed(seed)
    tower = ImageTower(spec.model.vision, spec.model.embed_dim).eval()

    @torch.no_grad()
    def embed(pixels: np.ndarray) -> np.ndarray:
        return tower(torch.from_numpy(pixels)).numpy()

    return spec.preprocess, embed


def run(
    ckpt_dir: Path | None,
    out: Path,
    *,
    size: str | None = None,
    catalog: Path | None = None,
    catalog_photos_n: int = 40,
    megapixels: Sequence[float] = DEFAULT_MEGAPIXELS,
    min_time: float = 2.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    cfg, embed = checkpoint_embedder(ckpt_dir) if ckpt_dir is not None else random_embedder(size or "tiny")
    photos = skimage_photos(megapixels)
    if catalog is not None:
        photos += catalog_photos(catalog, catalog_photos_n)
    log(f"{len(photos)} photos, image_size {cfg.image_size}, draft keeps >= {JPEG_DRAFT_MARGIN * cfg.image_size} px")
    gate_rows = gate(photos, cfg, embed)
    speed_rows = throughput_rows(photos, cfg, min_time)
    min_cos = min(r["cosine"] for r in gate_rows)
    result = {
        "date": now_utc(),
        "command": "python -m benchmarks.preprocess " + " ".join(sys.argv[1:]),
        "checkpoint": str(ckpt_dir) if ckpt_dir is not None else f"random-init {size} image tower",
        "image_size": cfg.image_size,
        "draft_margin": JPEG_DRAFT_MARGIN,
        "gate_min_cosine": GATE_MIN_COSINE,
        "min_cosine": min_cos,
        "gate_passed": min_cos >= GATE_MIN_COSINE,
        "hardware": hardware(),
        "versions": versions(),
        "gate": gate_rows,
        "throughput": speed_rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(speed_rows, out / "preprocess.csv")
    write_rows_csv(gate_rows, out / "preprocess_gate.csv")
    write_json(result, out / "preprocess.json")
    return result


def summary(result: dict[str, Any]) -> str:
    cols = [
        ("size", "size"),
        ("photos", "photos"),
        ("mean_megapixels", "MP"),
        ("full_images_per_s", "full img/s"),
        ("draft_images_per_s", "draft img/s"),
        ("ratio", "draft / full"),
    ]
    verdict = "passed" if result["gate_passed"] else "FAILED"
    return (
        markdown_table(result["throughput"], cols)
        + f"\n\nembedding gate (cosine full vs draft >= {result['gate_min_cosine']}): min {result['min_cosine']:.6f} "
        f"over {len(result['gate'])} photos at image_size {result['image_size']}: {verdict}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m benchmarks.preprocess", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="checkpoint whose image tower gates the embeddings")
    model.add_argument("--size", help="gate with a random-init image tower of this named size (e.g. base)")
    p.add_argument("--catalog", type=Path, help="also use this catalog's street photos")
    p.add_argument("--catalog-photos", type=int, default=40, help="how many catalog street photos")
    p.add_argument(
        "--megapixels", default=",".join(f"{m:g}" for m in DEFAULT_MEGAPIXELS), help="photo sizes to upscale to"
    )
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per side and size")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/preprocess"), help="output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    megapixels = tuple(float(m) for m in args.megapixels.split(",") if m.strip())
    result = run(
        args.checkpoint,
        args.out,
        size=args.size,
        catalog=args.catalog,
        catalog_photos_n=args.catalog_photos,
        megapixels=megapixels,
        min_time=args.min_time,
    )
    print(summary(result))
    return 0 if result["gate_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
