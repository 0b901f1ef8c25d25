"""Training and evaluation end to end on a small catalog (a few seconds on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mim import checkpoint as ckpt
from mim.embedding import TorchEmbedder
from mim.evaluate import evaluate
from mim.synth import CATEGORIES, COLOURS, PATTERNS, generate_catalog
from mim.train import batch_loss, load_split, main, train


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    return generate_catalog(
        tmp_path_factory.mktemp("cat"),
        seed=3,
        image_size=48,
        categories=CATEGORIES[:4],
        patterns=PATTERNS[:3],
        colours=COLOURS[:3],
        progress=False,
    )


def _fixed_batch_loss(ck_dir, catalog, objective):
    c = ckpt.load_checkpoint(ck_dir)
    data = load_split(catalog, "train", c.pre_cfg, progress=False)
    with torch.no_grad():
        return float(batch_loss(c.model, c.tokenizer, data, objective, np.random.default_rng(123), 8)[0])


@pytest.mark.parametrize("objective", ["dml", "4tower"])
def test_short_training_lowers_the_loss(small_catalog, tmp_path, objective):
    kw = {
        "catalog": str(small_catalog.root),
        "objective": objective,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup": 2,
        "no_progress": True,
    }
    start = train(out=str(tmp_path / "a"), steps=1, **kw)
    trained = train(out=str(tmp_path / "b"), steps=40, **kw)
    assert _fixed_batch_loss(trained, small_catalog, objective) < 0.8 * _fixed_batch_loss(
        start, small_catalog, objective
    )


class _Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(small_catalog, tmp_path, monkeypatch):
    args = [
        "--catalog",
        str(small_catalog.root),
        "--batch-size",
        "6",
        "--no-progress",
        "--save-every",
        "3",
        "--steps",
        "6",
    ]
    main([*args, "--out", str(tmp_path / "straight")])

    real_save = ckpt.save_checkpoint

    def save_then_crash(*a, **kw):
        real_save(*a, **kw)
        raise _Crash("killed right after the step-3 checkpoint")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        main([*args, "--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert ckpt.read_config(tmp_path / "resumed")["meta"]["step"] == 3
    main([*args, "--out", str(tmp_path / "resumed"), "--resume"])
    a = load_file(str(tmp_path / "straight" / ckpt.WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / ckpt.WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_four_tower_starts_from_three_tower_weights(small_catalog, tmp_path):
    kw = {"catalog": str(small_catalog.root), "batch_size": 6, "no_progress": True}
    three = train(out=str(tmp_path / "3"), objective="3tower", steps=2, **kw)
    # lr 0: the one 4-tower step leaves the weights where the 3-tower run ended.
    four = train(out=str(tmp_path / "4"), objective="4tower", steps=1, lr=0.0, init_from=str(three), **kw)
    w3, w4 = load_file(str(three / ckpt.WEIGHTS)), load_file(str(four / ckpt.WEIGHTS))
    for k in w3:
        torch.testing.assert_close(w3[k], w4[k], rtol=0, atol=0, msg=k)
    assert ckpt.read_config(four)["meta"]["init_from"] == str(three)


def test_bad_arguments(small_catalog, tmp_path):
    with pytest.raises(ValueError, match="larger than the .* training products"):
        train(catalog=str(small_catalog.root), out=str(tmp_path / "x"), steps=1, batch_size=10_000, no_progress=True)
    with pytest.raises(ValueError, match="unknown objective"):
        train(catalog=str(small_catalog.root), out=str(tmp_path / "x"), objective="5tower", no_progress=True)


def test_evaluate_reports_every_metric(small_catalog, tmp_path):
    out = train(catalog=str(small_catalog.root), out=str(tmp_path / "e"), steps=2, batch_size=6, no_progress=True)
    m = evaluate(TorchEmbedder(ckpt.load_checkpoint(out)), small_catalog, "test")
    for key in ("image R@1", "image R@10", "image catP@10", "title R@1", "n_gallery"):
        assert key in m
    assert 0.0 <= m["image R@1"] <= m["image R@5"] <= m["image R@10"] <= 1.0


def test_augment_moves_pixels_but_keeps_shape_dtype_and_range():
    from mim.train import augment

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 48, 48)).astype(np.float32)
    y = augment(x, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.float32
    assert not np.allclose(x, y)
    # bilinear sampling with border padding never leaves the input's value range
    assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5
    np.testing.assert_array_equal(y, augment(x, np.random.default_rng(1)))  # seeded: same draw, same batch
