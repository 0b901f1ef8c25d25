"""Core package shared by training, export, serving and search.

`mim` stands for Multimodal Image Matching (Zhu et al., KDD 2024): one image encoder and one text encoder
trained with image-image metric learning plus image-text alignment, used for image matching and for
multimodal (image + reformulation text) search.
"""

__version__ = "0.1.0"
