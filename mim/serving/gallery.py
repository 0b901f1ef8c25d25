"""The gallery the `knn` model serves: where it lives in a repository, how it is checked, and how a new one is
installed while the server keeps answering.

    <repo>/knn/<version>/gallery.safetensors    a KnnIndex file (mim.search.knn), one per version folder
    <repo>/knn/<version>/model.py               the generated python-backend entry point

The repository's generator writes `knn/1/` with `model.py` only. `install_gallery` adds each gallery as a NEW
version folder (the next integer), built in a hidden temp folder and renamed into place, so a server never
sees a folder without its gallery. Triton serves the latest version of a model (its default version policy):
loading the model again through the model-control API loads the new version next to the old one, then retires
the old one once its requests in flight are answered. Versions older than the previous one are removed.

The `knn` model refuses to load a gallery built with another model than the repository's encoders: the
gallery records a `model_id` (KnnIndex), the encoders theirs in their export records
(`mim.layout.installed_model_id`). File names are mim.layout's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mim import contract
from mim.atomic import atomic_write_dir
from mim.errors import ServingInputError
from mim.layout import GALLERY_FILE, MODEL_PY, VERSION, installed_model_id
from mim.search.knn import KnnIndex, read_model_id
from mim.serving.repository import MODEL_PY_TEMPLATE, WRITE_COMMAND

SEARCH_ENSEMBLES = (contract.SEARCH_IMAGE, contract.SEARCH_TEXT, contract.SEARCH_MULTIMODAL)
INSTALL_HINT = "build one with `mimsearch index ... --install REPO` (or mim.serving.gallery.install_gallery)"


class GalleryError(ServingInputError):
    pass


def encoders_model_id(repo: str | Path) -> str:
    """The model id of the repository's encoders (`mim.layout.installed_model_id`), as a GalleryError."""
    try:
        return installed_model_id(repo)
    except ValueError as e:
        raise GalleryError(f"the gallery cannot be checked against the encoders: {e}") from None


def versions(repo: str | Path) -> list[int]:
    """The `knn` model's version folders, ascending."""
    model_dir = Path(repo) / contract.KNN
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_gallery(repo: str | Path) -> Path | None:
    """The gallery file of the version Triton serves (the latest), None when that version has none."""
    found = versions(repo)
    if not found:
        return None
    path = Path(repo) / contract.KNN / str(found[-1]) / GALLERY_FILE
    return path if path.is_file() else None


def servable_models(repo: str | Path) -> list[str]:
    """Models of the contract present in `repo` that can load now: all of them, except `knn` and the search
    ensembles while no gallery of the encoders' model is installed (a gallery left from an earlier export
    waits for its replacement instead of failing the start; loading it explicitly says what is wrong)."""
    repo = Path(repo)
    present = [name for name in contract.MODELS if (repo / name).is_dir()]
    if not gallery_fits(repo):
        present = [m for m in present if m not in (contract.KNN, *SEARCH_ENSEMBLES)]
    return present


def gallery_fits(repo: str | Path) -> bool:
    """Whether the latest gallery exists and records the encoders' model id (header only)."""
    return gallery_problem(repo) is None


def gallery_problem(repo: str | Path) -> str | None:
    """Why `knn` and the search ensembles cannot load from `repo` now, with the command that fixes it; None when
    they can (the latest gallery records the encoders' model id)."""
    path = latest_gallery(repo)
    fix = f"run `mimsearch index --catalog ... --store GALLERY.safetensors --install {repo}` with this model"
    if path is None:
        return f"no gallery installed in {Path(repo) / contract.KNN}; {fix}"
    try:
        built_with, encoders = read_model_id(path), encoders_model_id(repo)
    except ValueError as e:  # GalleryError included
        return f"{path} cannot be checked ({e}); {fix}"
    if built_with != encoders:
        return f"the gallery {path} was built with model {built_with}, the encoders are model {encoders}: {fix}"
    return None


def load_gallery(version_dir: str | Path, *, dim: int | None = None, device: str = "auto") -> KnnIndex:
    """What the `knn` model does at `initialize`: load the version folder's gallery, refusing a missing or
    corrupt file, one of another model than the repository's encoders, or one of another width."""
    version_dir = Path(version_dir)
    path = version_dir / GALLERY_FILE
    if not path.is_file():
        raise GalleryError(f"{path} not found: the knn model has no gallery to search; {INSTALL_HINT}")
    expected = encoders_model_id(version_dir.parents[1])
    try:
        index = KnnIndex.load(path, expected_model_id=expected, device=device)
    except (ValueError, OSError) as e:  # the message names the file and what is wrong with it
        raise GalleryError(f"gallery refused: {e}") from None
    if dim is not None and index.dim != dim:
        raise GalleryError(f"{path} holds {index.dim}-d embeddings; the knn model config expects {dim}")
    if len(index) == 0:
        raise GalleryError(f"{path} holds no items; {INSTALL_HINT}")
    index.warm_up()  # the CPU's kernels and bfloat16 gallery copy made now, not in the first request
    return index


def install_gallery(index_path: str | Path, repo: str | Path, *, keep: int = 2) -> Path:
    """Install the KnnIndex file `index_path` as the next version of `repo`'s `knn` model; returns the new
    version folder. The file must come from the model of the repository's encoders. The newest `keep`
    versions stay (the one being served and the new one); older ones are removed, except the generated
    folder `1/`."""
    repo, index_path = Path(repo), Path(index_path)
    expected = encoders_model_id(repo)
    try:
        KnnIndex.load(index_path, expected_model_id=expected, device="cpu")  # refuse it here, not at load
    except (ValueError, OSError) as e:
        raise GalleryError(f"not installing {index_path}: {e}") from None
    model_dir = repo / contract.KNN
    if not model_dir.is_dir():
        raise GalleryError(f"{model_dir} not found; write the repository first (`{WRITE_COMMAND}`)")
    target = model_dir / str(max(versions(repo), default=0) + 1)

    def write(tmp: Path) -> None:
        shutil.copyfile(index_path, tmp / GALLERY_FILE)
        (tmp / MODEL_PY).write_text(MODEL_PY_TEMPLATE.format(command=WRITE_COMMAND, name=contract.KNN))

    atomic_write_dir(target, write)
    for old in versions(repo)[:-keep] if keep > 0 else []:
        if str(old) != VERSION:
            shutil.rmtree(model_dir / str(old), ignore_errors=True)
    return target
