"""Core package shared by training, export, serving and search.

`mim` stands for Multimodal Image Matching (Zhu et al., KDD 2024): one image encoder and one text encoder
trained with image-image metric learning plus image-text alignment, used for image matching and for
multimodal (image + reformulation text) search.

One subpackage per job: `data` (catalogs and datasets), `model` (towers, tokenizers, preprocessing,
checkpoints), `training` (training and evaluation), `search` (kNN, vector stores, ranking, embedders) and
`serving` (the Triton side). `contract`, `layout`, `atomic`, `progress`, `tables` (the markdown-table
writer) and `checks` (argument predicates) are shared by all of them and import nothing from the
subpackages but the model configs the contract's dims come from; `errors` (the root of the errors meant for a
user, one base per package) and `commandline` (the parser every command uses) import nothing.
"""

__version__ = "0.1.0"
