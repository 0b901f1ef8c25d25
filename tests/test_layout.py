"""mim.layout owns the installed repository's files and the served model's identity: a repository installed by
`export.engines.build_and_install` holds every file the layout names, the identity a client reads through a real
server is the checkpoint's, and a gallery of another model is refused without any --repository/--checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _client_helpers import small_catalog

from client import cli
from client.indexing import build_index, catalog_items
from client.triton_client import EmbeddingClient
from export.engines import build_and_install
from mim import contract, layout
from mim.model.config import ModelConfig, PreprocessConfig
from mim.search.knn import KnnIndex
from mim.serving.repository import (
    DEFAULT_REPOSITORY,
    check_repository,
    parse_config,
    prepare_repository,
    render_repository,
)


def _configs(repo: Path, model: str) -> list[Path]:
    return [repo / model / layout.DEFAULT_CONFIG, *sorted((repo / model / "configs").glob("*.pbtxt"))]


@pytest.fixture(scope="module")
def installed(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    repo = prepare_repository(root / "model_repository")
    report = build_and_install(tiny_checkpoint, repo, export_dir=root / "export", tensorrt=False, check=False)
    return repo, report


def test_installed_repository_holds_every_file_the_layout_names(installed, tiny_checkpoint):
    repo, report = installed
    want = set(layout.installed_files(repo, fp16=True, plan=False))
    assert set(report.files) == want and all(p.is_file() for p in want)
    assert report.model_id == layout.model_id_of_checkpoint(tiny_checkpoint)
    assert report.tensorrt_skipped == "TensorRT build skipped (not requested: --no-tensorrt)"
    for tower in layout.ENCODERS:
        vdir = layout.version_dir(repo, tower)
        assert json.loads((vdir / layout.EXPORT_JSON).read_text())[layout.MODEL_ID] == report.model_id
        assert ModelConfig.from_dict(json.loads((vdir / layout.MODEL_JSON).read_text())) == ModelConfig.from_dict(
            json.loads((report.export_dir / layout.MODEL_JSON).read_text())
        )
    # The configs are the generator's for this checkpoint and this identity, nothing else.
    export = report.export_dir
    model_cfg = ModelConfig.from_dict(json.loads((export / layout.MODEL_JSON).read_text()))
    pre_cfg = PreprocessConfig.from_dict(json.loads((export / layout.PREPROCESS_JSON).read_text()))
    assert check_repository(repo, model_cfg, pre_cfg, model_id=report.model_id) == []
    assert check_repository(repo, model_cfg, pre_cfg) != []  # without the identity the configs differ


def test_every_encoder_config_carries_the_identity_and_the_committed_one_none(installed):
    repo, report = installed
    for tower in layout.ENCODERS:
        for path in _configs(repo, tower):
            assert layout.served_model_id(parse_config(path.read_text(), str(path))) == report.model_id, path
        for path in _configs(DEFAULT_REPOSITORY, tower):
            assert layout.served_model_id(parse_config(path.read_text(), str(path))) is None, path
    # Only the encoders carry it.
    assert layout.MODEL_ID not in (repo / contract.FUSE / layout.DEFAULT_CONFIG).read_text()


def test_reinstall_reuses_an_export_of_the_same_checkpoint(installed, tiny_checkpoint):
    repo, first = installed
    again = build_and_install(
        tiny_checkpoint, repo, export_dir=first.export_dir, tensorrt=False, check=False, reuse_export=True
    )
    assert again.reused_export and again.export == first.export and set(again.files) == set(first.files)
    assert any("not exported again" in line for line in again.lines())


def test_prepare_repository_copies_configs_without_artifacts(installed, tmp_path):
    repo, _ = installed
    copy = prepare_repository(tmp_path / "copy", source=repo)
    assert not [p for p in copy.rglob("*") if p.is_file() and p.suffix in (".onnx", ".plan", ".json")]
    assert (copy / contract.IMAGE_ENCODER / layout.VERSION / layout.MODEL_PY).is_file()
    assert (copy / contract.EMBED_IMAGE / layout.VERSION / layout.KEEP_FILE).is_file()
    (copy / "stale.txt").write_text("x")
    prepare_repository(copy, fresh=True, source=repo)
    assert not (copy / "stale.txt").exists()


# --- through a real server ------------------------------------------------------------------------------------
@pytest.mark.server
def test_identity_read_through_the_server_is_the_checkpoint_hash(triton_server, tiny_checkpoint):
    with EmbeddingClient(triton_server.grpc_url, timeout_s=60) as client:
        assert cli.served_model_id(client) == layout.model_id_of_checkpoint(tiny_checkpoint)
        for tower in layout.ENCODERS:
            served = layout.served_model_id(client.model_config(tower))
            assert served == layout.model_id_of_checkpoint(tiny_checkpoint)


@pytest.mark.server
def test_index_and_search_take_the_identity_from_the_server(triton_server, tiny_checkpoint, tmp_path, capsys):
    catalog = small_catalog(tmp_path / "catalog")
    url = triton_server.grpc_url
    ours = tmp_path / "ours.safetensors"
    argv = ["index", "--url", url, "--catalog", str(catalog.root), "--out", str(ours), "--no-progress"]
    assert cli.main(argv) == 0
    served_id = layout.model_id_of_checkpoint(tiny_checkpoint)
    assert KnnIndex.load(ours).model_id == served_id
    assert f"model_id {served_id} from the server's image_encoder config" in capsys.readouterr().err
    assert cli.main(["search", "--url", url, "--index", str(ours), "--text", "zebra mug", "-k", "2"]) == 0
    capsys.readouterr()

    # A gallery embedded by another model: refused, naming both ids, with no flag about the model at all.
    with EmbeddingClient(url, timeout_s=60) as client:
        other = tmp_path / "other.safetensors"
        items = catalog_items(catalog, "test")
        build_index(client.embed_images, items, other, model_id="0123456789abcdef", progress=False)
    assert cli.main(["search", "--url", url, "--index", str(other), "--text", "zebra mug"]) == 2
    err = capsys.readouterr().err
    assert f"model_id='0123456789abcdef' but expected_model_id='{served_id}'" in err
    # --model-id stays an explicit override.
    argv = ["search", "--url", url, "--index", str(other), "--text", "zebra mug", "--model-id", "0123456789abcdef"]
    assert cli.main(argv) == 0


class CommittedRepositoryServer:
    """Answers the model-config call as a server running the committed (never installed) repository would:
    with the committed config, which carries no identity."""

    def model_config(self, model: str):
        path = DEFAULT_REPOSITORY / model / "configs" / "cpu.pbtxt"
        return parse_config(path.read_text(), str(path))


def test_unknown_identity_says_what_to_do():
    args = cli.build_parser().parse_args(["index", "--catalog", "c", "--out", "o"])
    with pytest.raises(cli.UsageError, match=r"index: the served model's identity is unknown: .*mimsearch engines"):
        cli.resolve_model_id(args, CommittedRepositoryServer())
    args = cli.build_parser().parse_args(["search", "--index", "g", "--text", "t", "--model-id", "v1"])
    assert cli.resolve_model_id(args, CommittedRepositoryServer()) == ("v1", "--model-id")


def test_layout_names_agree_with_the_rest():
    # The artifact globs cover every installed file, and no committed file.
    import fnmatch

    installed = layout.installed_files("repo", plan=True)
    assert all(any(fnmatch.fnmatch(p.name, g) for g in layout.ARTIFACT_GLOBS) for p in installed)
    generated = [Path(rel) for rel in render_repository()]
    assert generated and not [p for p in generated if any(fnmatch.fnmatch(p.name, g) for g in layout.ARTIFACT_GLOBS)]
