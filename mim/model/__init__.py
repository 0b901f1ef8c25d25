"""The model: tower configs, the towers, their losses, tokenizers, image preprocessing and checkpoints.

config       typed tower and preprocessing configs and the named sizes (tiny, base, CLIP shapes)
towers       the image and text encoders (`MIMModel`)
losses       the DML / 3-tower / 4-tower objectives
tokenizer    the word-piece tokenizer and CLIP's byte-pair tokenizer (its merge list is in assets/)
preprocess   image decoding and resizing, text decoding: the same code in training and serving
checkpoint   a checkpoint folder: weights, configs, tokenizer files, the model identity
import_clip  pretrained CLIP (Hugging Face / OpenCLIP) converted to a checkpoint (`mimsearch import-clip`)

May import: `mim.atomic`, `mim.errors`, `mim.layout` and itself; never data, training, search or serving.
"""
