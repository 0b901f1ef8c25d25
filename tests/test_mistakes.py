"""Plain mistakes a new user makes, one row per command: each gets one `error:` line naming the cause, a non-zero
exit code, no traceback, and leaves every file as it was (nothing written, nothing changed, nothing generated).

The commands run in-process through `mimsearch.cli.main`, in a scratch folder that holds a small catalog, a JSON
Lines dataset of it, a checkpoint and the mistakes' material; the folder's listing (names, sizes, mtimes) is
compared before and after.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_small_catalog, make_tiny_checkpoint

from mim.data.dataset import write_dataset
from mimsearch import cli

NO_SERVER = "127.0.0.1:{port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mistakes")
    cat = make_small_catalog(root / "cat")
    data = write_dataset(cat, root / "cat" / "data.jsonl")
    lines = data.read_text().splitlines()
    (root / "cat" / "bad.jsonl").write_text("\n".join(lines[:5] + ['{"category": "mug"}'] + lines[5:]) + "\n")
    (root / "cat" / "noval.jsonl").write_text("\n".join(x for x in lines if json.loads(x)["split"] != "val") + "\n")
    make_tiny_checkpoint(root / "ckpt")
    (root / "no-weights").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (root / "no-weights" / name).write_bytes((root / "ckpt" / name).read_bytes())
    (root / "a-file").write_text("not a folder\n")
    (root / "used-out").mkdir()
    (root / "used-out" / "notes.txt").write_text("my work\n")
    return root


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


TRAIN = ["train", "--no-progress", "--steps", "2"]
# (id, argv, exit code, what the one line must say). {url}: an address where nothing listens.
MISTAKES = [
    ("train: bad dataset line", [*TRAIN, "--catalog", "cat/bad.jsonl", "--out", "o"], 2, r"bad.jsonl:6: field"),
    ("train: catalog path that does not exist", [*TRAIN, "--catalog", "typo", "--out", "o"], 2, "no catalog manifest"),
    ("train: --size huge", [*TRAIN, "--catalog", "cat", "--size", "huge", "--out", "o"], 2, "invalid choice: 'huge'"),
    ("train: --steps -5", ["train", "--catalog", "cat", "--steps", "-5", "--out", "o"], 2, "expected an integer >= 1"),
    ("train: non-empty --out", [*TRAIN, "--catalog", "cat", "--out", "used-out"], 2, "used-out is not empty.*--resume"),
    ("train: --out is a file", [*TRAIN, "--catalog", "cat", "--out", "a-file", "--overwrite"], 2, "is a file"),
    ("train: batch larger than the data", [*TRAIN, "--catalog", "cat", "--out", "o"], 2, "--batch-size 64 is larger"),
    ("evaluate: missing checkpoint", ["evaluate", "--checkpoint", "nope", "--catalog", "cat"], 2, "nope/config.json"),
    (
        "evaluate: empty split",
        ["evaluate", "--checkpoint", "ckpt", "--catalog", "cat/noval.jsonl", "--split", "val"],
        2,
        "val split .* has 0 products",
    ),  # fmt: skip
    ("diagnose: catalog is a file", ["diagnose", "--checkpoint", "ckpt", "--catalog", "a-file"], 2, r"\(a file\)"),
    ("compare: catalog path that does not exist", ["compare", "--catalog", "typo", "--out", "q"], 2, "no catalog"),
    ("export: missing weights", ["export", "--checkpoint", "no-weights", "--out", "x"], 2, "model.safetensors not"),
    (
        "engines: missing weights",
        ["engines", "--checkpoint", "no-weights", "--repository", "r"],
        2,
        "no-weights/model.safetensors not found",
    ),  # fmt: skip
    ("demo: a file as --artifacts", ["demo", "--artifacts", "a-file", "--quick"], 2, "--artifacts a-file is a file"),
    (
        "index: no server",
        ["index", "--catalog", "cat", "--store", "g.safetensors", "--url", "{url}", "--wait", "0.5"],
        1,
        "not ready within .*mimsearch serve",
    ),  # fmt: skip
    (
        "index: bad Milvus index option",
        ["index", "--catalog", "cat", "--store", "g.db", "--milvus-index", "HNSW:foo=1"],
        2,
        "HNSW takes no parameter foo",
    ),  # fmt: skip
    (
        "search: no server",
        ["search", "--store", "g.safetensors", "--text", "mug", "--url", "{url}", "--wait", "0.5"],
        1,
        "not ready within",
    ),  # fmt: skip
    (
        "perf: no server",
        ["perf", "--url", "{url}", "--catalog", "cat", "--out", "p"],
        1,
        "no server answers|perf_analyzer not found",
    ),  # fmt: skip
    (
        "quality: no server",
        ["quality", "--url", "{url}", "--checkpoint", "ckpt", "--catalog", "cat", "--wait", "0.5", "--out", "q"],
        1,
        "not ready within .*mimsearch serve",
    ),  # fmt: skip
    ("demo: --steps 0", ["demo", "--artifacts", "d", "--steps", "0"], 2, "argument --steps: expected an integer >= 1"),
    ("import-clip: missing folder", ["import-clip", "--hf", "nope", "--out", "c"], 2, "nope"),
    ("dataset: missing catalog", ["dataset", "--catalog", "typo", "--out", "typo/d.jsonl"], 2, "no catalog manifest"),
    ("serve: missing repository", ["serve", "--repository", "nope"], 2, "nope"),
]
if not torch.cuda.is_available():
    MISTAKES.append(
        (
            "train: --device cuda without CUDA",
            [*TRAIN, "--catalog", "cat", "--device", "cuda", "--out", "o"],
            2,
            "no CUDA device; use --device cpu",
        )  # fmt: skip
    )


@pytest.mark.parametrize(("argv", "code", "says"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_plain_mistake_gets_one_line_and_changes_nothing(scratch, monkeypatch, capsys, argv, code, says):
    monkeypatch.chdir(scratch)
    monkeypatch.delenv("MIM_DEBUG", raising=False)
    url = NO_SERVER.format(port=_free_port())
    before = listing(scratch)
    try:
        rc = cli.main([a.replace("{url}", url) for a in argv])
    except SystemExit as e:  # argparse's own refusals (exit 2) end in sys.exit
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(says, lines[0]), lines[0]
    assert listing(scratch) == before


def test_debug_shows_the_traceback(scratch, monkeypatch, capsys):
    from mim.errors import MimError

    monkeypatch.chdir(scratch)
    with pytest.raises(MimError, match="no catalog manifest"):
        cli.main(["--debug", *TRAIN, "--catalog", "typo", "--out", "o"])
    monkeypatch.setenv("MIM_DEBUG", "1")
    with pytest.raises(MimError, match="no catalog manifest"):
        cli.main([*TRAIN, "--catalog", "typo", "--out", "o"])
    assert not (scratch / "typo").exists() and not (scratch / "o").exists()


def test_every_error_base_is_a_mim_error():
    import benchmarks
    import export
    from client.cli import UsageError
    from client.triton_client import ClientError
    from mim import errors

    for base in (errors.DataError, errors.ModelError, errors.TrainingError, errors.SearchError, errors.ServingError):
        assert issubclass(base, errors.MimError)
    assert issubclass(export.ExportError, errors.MimError) and issubclass(benchmarks.BenchError, errors.MimError)
    assert ClientError.exit_code == 1 and UsageError.exit_code == 2
    # Input errors of a package whose base is a failure keep exit code 2 (the method order would give 1).
    from mim.search.stores.milvus import MilvusIndexError
    from mim.serving.gallery import GalleryError
    from mim.serving.repository import RepositoryError

    assert [e.exit_code for e in (MilvusIndexError, GalleryError, RepositoryError, errors.DataError)] == [2] * 4
    assert errors.SearchError.exit_code == errors.ServingError.exit_code == 1


def test_engines_refuses_the_committed_repository(scratch, monkeypatch, capsys):
    from mim.serving.repository import DEFAULT_REPOSITORY

    monkeypatch.chdir(scratch)
    before = listing(DEFAULT_REPOSITORY)
    rc = cli.main(["engines", "--checkpoint", "ckpt", "--repository", str(DEFAULT_REPOSITORY), "--export-dir", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is the committed reference repository" in err, err
    assert listing(DEFAULT_REPOSITORY) == before and not (scratch / "x").exists()


def test_engines_fills_a_new_repository_from_the_committed_one(tmp_path):
    from export.engines import DEFAULT_INSTALL_REPOSITORY, build_parser, prepare_install_target
    from mim.serving.repository import DEFAULT_REPOSITORY, check_repository

    assert build_parser().parse_args(["--checkpoint", "c"]).repository == DEFAULT_INSTALL_REPOSITORY
    assert DEFAULT_INSTALL_REPOSITORY.parts[0] == "artifacts"  # ignored by git
    prepare_install_target(tmp_path / "repo")
    assert check_repository(tmp_path / "repo") == []  # the committed tree, configs as generated
    (tmp_path / "repo" / "knn" / "mine.txt").write_text("kept\n")
    prepare_install_target(tmp_path / "repo")  # an existing repository is installed into as it is
    assert (tmp_path / "repo" / "knn" / "mine.txt").read_text() == "kept\n"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(p.name for p in DEFAULT_REPOSITORY.iterdir())
