"""Training and evaluation end to end on a small catalog (a few seconds on 2 cores)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mim.data.synth import CATEGORIES, COLOURS, PATTERNS, generate_catalog
from mim.model import checkpoint as ckpt
from mim.search.embedding import TorchEmbedder
from mim.training.evaluate import evaluate, evaluate_per_query
from mim.training.train import HARD_GROUP, TrainConfig, batch_loss, compose_batch, load_split, lr_at, train
from mimsearch.commands.train import main


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    return generate_catalog(
        tmp_path_factory.mktemp("cat"),
        seed=3,
        image_size=48,
        categories=CATEGORIES[:4],
        patterns=PATTERNS[:3],
        colours=COLOURS[:3],
        variants=2,
        street_fraction=0.5,
        progress=False,
    )


def _fixed_batch_loss(ck_dir, catalog, objective):
    c = ckpt.load_checkpoint(ck_dir)
    data = load_split(catalog, "train", c.pre_cfg, progress=False)
    with torch.no_grad():
        return float(batch_loss(c.model, c.tokenizer, data, objective, np.random.default_rng(123), 8)[0])


@pytest.mark.parametrize("objective", ["dml", "4tower"])
def test_short_training_lowers_the_loss(small_catalog, tmp_path, objective):
    config = TrainConfig(objective=objective, batch_size=8, lr=2e-3, warmup=2)
    kw = {"catalog": str(small_catalog.root), "progress": False}
    start = train(replace(config, steps=1), out=str(tmp_path / "a"), **kw)
    trained = train(replace(config, steps=40), out=str(tmp_path / "b"), **kw)
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
    kw = {"catalog": str(small_catalog.root), "progress": False}
    three = train(TrainConfig(objective="3tower", steps=2, batch_size=6), out=str(tmp_path / "3"), **kw)
    # lr 0: the one 4-tower step leaves the weights where the 3-tower run ended.
    four = train(
        TrainConfig(objective="4tower", steps=1, batch_size=6, lr=0.0), out=str(tmp_path / "4"), init_from=three, **kw
    )
    w3, w4 = load_file(str(three / ckpt.WEIGHTS)), load_file(str(four / ckpt.WEIGHTS))
    for k in w3:
        torch.testing.assert_close(w3[k], w4[k], rtol=0, atol=0, msg=k)
    assert ckpt.read_config(four)["meta"]["init_from"] == str(three)


def test_a_schedule_continued_in_a_second_stage_equals_one_run(small_catalog, tmp_path):
    """The progressive recipe's continued schedule: stage 2 starts at the schedule step where stage 1 stopped, with
    its optimizer state and batches, so two stages of one objective are the uninterrupted run."""
    kw = {"catalog": str(small_catalog.root), "progress": False}
    config = TrainConfig(objective="3tower", batch_size=6, warmup=2, lr=2e-3)
    straight = train(replace(config, steps=6), out=str(tmp_path / "straight"), **kw)
    first = train(replace(config, steps=3, schedule_steps=6), out=str(tmp_path / "first"), **kw)
    second = train(
        replace(config, steps=3, schedule_steps=6, schedule_start=3),
        out=str(tmp_path / "second"),
        init_from=first,
        **kw,
    )
    a, b = load_file(str(straight / ckpt.WEIGHTS)), load_file(str(second / ckpt.WEIGHTS))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # Without the carried optimizer state and schedule, the second stage is another run.
    restarted = train(replace(config, steps=3), out=str(tmp_path / "restart"), init_from=first, **kw)
    c = load_file(str(restarted / ckpt.WEIGHTS))
    assert any(not torch.equal(a[k], c[k]) for k in a)
    meta = ckpt.read_config(second)["meta"]
    assert (meta["schedule_start"], meta["schedule_steps"]) == (3, 6)
    with pytest.raises(ValueError, match=r"expected init_from \(--init-from\), the checkpoint of that run"):
        train(replace(config, steps=3, schedule_steps=6, schedule_start=3), out=str(tmp_path / "orphan"), **kw)


def test_lr_schedule_warms_up_once_and_decays_to_zero():
    full = [lr_at(s, 10, 1.0, 2) for s in range(10)]
    assert full[0] == 0.5 and full[1] == 1.0 and full[2] == 1.0 and full[-1] > 0
    assert all(a >= b for a, b in zip(full[1:], full[2:]))
    # The second stage of a continued schedule is the tail of the same curve: no second warm-up.
    tail = TrainConfig(steps=5, schedule_steps=10, schedule_start=5)
    assert [lr_at(tail.schedule_start + s, tail.schedule_total, 1.0, 2) for s in range(5)] == full[5:]


def test_bad_arguments(small_catalog, tmp_path):
    with pytest.raises(ValueError, match="larger than the .* training products"):
        train(TrainConfig(steps=1, batch_size=10_000), catalog=str(small_catalog.root), out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown objective '5tower'; expected one of"):
        TrainConfig(objective="5tower")
    with pytest.raises(ValueError, match=r"steps=0; expected a positive int"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="run past the schedule's 6 steps"):
        TrainConfig(steps=4, schedule_steps=6, schedule_start=3)
    with pytest.raises(ValueError, match="expected ints >= 0"):
        TrainConfig(steps=4, schedule_start=-1)


def test_evaluate_reports_every_metric(small_catalog, tmp_path):
    out = train(
        TrainConfig(steps=2, batch_size=6), catalog=str(small_catalog.root), out=str(tmp_path / "e"), progress=False
    )
    m = evaluate(TorchEmbedder(ckpt.load_checkpoint(out)), small_catalog, "test")
    for key in ("image R@1", "image R@10", "image catP@10", "title R@1", "n_gallery"):
        assert key in m
    assert 0.0 <= m["image R@1"] <= m["image R@5"] <= m["image R@10"] <= 1.0
    # A top 1 is the exact product, another category, another model with the title, or neither; never two of them.
    per = evaluate_per_query(TorchEmbedder(ckpt.load_checkpoint(out)), small_catalog, "test")
    outcomes = per["image R@1"] + per["image other-cat@1"] + per["image same-title@1"]
    assert set(np.unique(outcomes)) <= {0.0, 1.0} and len(outcomes) == m["n_queries"]
    assert per["image other-cat@1"].mean() == pytest.approx(m["image other-cat@1"])


def test_augment_moves_pixels_but_keeps_shape_dtype_and_range():
    from mim.training.train import augment

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 48, 48)).astype(np.float32)
    y = augment(x, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.float32
    assert not np.allclose(x, y)
    # bilinear sampling with border padding never leaves the input's value range
    assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5
    np.testing.assert_array_equal(y, augment(x, np.random.default_rng(1)))  # seeded: same draw, same batch


def test_load_split_keeps_title_only_products(small_catalog):
    from mim.model.config import get_size

    data = load_split(small_catalog, "train", get_size("tiny").preprocess, progress=False)
    assert len(data.product_ids) == len(small_catalog.products_in("train"))
    assert len(data.paired) == len(small_catalog.paired("train")) and len(data.unpaired) > 0
    assert all(len(data.queries_of[r]) > 0 for r in data.paired)
    assert all(len(data.queries_of[r]) == 0 for r in data.unpaired)
    assert sorted(np.concatenate([data.paired, data.unpaired]).tolist()) == list(range(len(data.product_ids)))


def _attributes(n_cat=4, n_pat=3, n_col=3, variants=2):
    return np.array(
        [[c, p, k] for c in range(n_cat) for p in range(n_pat) for k in range(n_col) for _ in range(variants)]
    )


def test_compose_batch_random_and_hard():
    attrs = _attributes()
    pool = np.arange(0, len(attrs), 2)  # a subset, as the paired rows are
    rand = compose_batch(np.random.default_rng(0), pool, attrs, 12, hard=False)
    hard = compose_batch(np.random.default_rng(0), pool, attrs, 12, hard=True)
    for rows in (rand, hard):
        assert len(rows) == 12 and len(set(rows.tolist())) == 12 and set(rows.tolist()) <= set(pool.tolist())
    # Hard groups: an anchor, then look-alikes that share its pattern or colour and are of another category.
    for g in range(0, 12, HARD_GROUP):
        anchor, *alike = hard[g : g + HARD_GROUP]
        assert alike, "with 4 categories every anchor has look-alikes"
        for r in alike:
            assert attrs[r, 0] != attrs[anchor, 0]
        assert all(attrs[r, 1] == attrs[anchor, 1] for r in alike) or all(
            attrs[r, 2] == attrs[anchor, 2] for r in alike
        )
    np.testing.assert_array_equal(hard, compose_batch(np.random.default_rng(0), pool, attrs, 12, hard=True))

    def n_hard_pairs(rows):
        a = attrs[rows]
        other_cat = a[:, None, 0] != a[None, :, 0]
        shares = (a[:, None, 1] == a[None, :, 1]) | (a[:, None, 2] == a[None, :, 2])
        return int((other_cat & shares).sum())

    assert n_hard_pairs(hard) > n_hard_pairs(rand)
    with pytest.raises(ValueError, match="a batch of 99 distinct rows needs at least 99 products"):
        compose_batch(np.random.default_rng(0), pool, attrs, 99, hard=True)


@pytest.mark.parametrize("objective", ["dml", "3tower", "4tower"])
def test_title_only_products_reach_only_the_photo_title_term(small_catalog, tiny_checkpoint, objective):
    from mim.model.config import get_size

    c = ckpt.load_checkpoint(tiny_checkpoint)
    data = load_split(small_catalog, "train", get_size("tiny").preprocess, progress=False)
    with torch.no_grad():
        _, base = batch_loss(c.model, c.tokenizer, data, objective, np.random.default_rng(5), 6)
        _, more = batch_loss(c.model, c.tokenizer, data, objective, np.random.default_rng(5), 6, catalog_rows=6)
    # The same rng draws the same pairs first; the extra rows change the photo-title term and nothing else.
    for k in base:
        if k == "pt":
            assert more[k] != pytest.approx(base[k])
        else:
            assert more[k] == pytest.approx(base[k], rel=1e-5), k


def test_hard_negative_training_and_learning_curve_callback(small_catalog, tmp_path):
    seen = []
    config = TrainConfig(objective="3tower", steps=4, batch_size=6, catalog_rows=4, hard_negatives=True)
    out = train(
        config,
        catalog=str(small_catalog.root),
        out=str(tmp_path / "h"),
        progress=False,
        eval_every=3,
        on_eval=lambda step, model, tok: seen.append((step, model.training, tok.vocab_size > 0)),
    )
    assert seen == [(3, False, True), (4, False, True)]
    meta = ckpt.read_config(out)["meta"]
    assert meta["hard_negatives"] is True and meta["catalog_rows"] == 4
    assert TrainConfig.from_meta(meta) == config  # the checkpoint records the whole config
    # A setting a checkpoint predates reads as its default; every difference is named.
    old = {k: v for k, v in meta.items() if k != "align_weight"}
    assert TrainConfig.from_meta(old).align_weight == TrainConfig().align_weight
    assert replace(config, lr=0.5).differences(config) == {"lr": (0.5, config.lr)}
