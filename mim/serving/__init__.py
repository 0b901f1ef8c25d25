"""Triton serving support: the generated repository, the python-backend models' logic, the launcher.

repository      config.pbtxt generation from the tensor contract (`mimsearch repository`)
runtimes        the encoder runtimes: which module builds an encoder's handler for a config variant
backends        the logic behind the python-backend models (NumPy / ONNX Runtime, tested without Triton)
torch_backend   the towers in torch as an encoder runtime (CPU FP32, CUDA FP16 with CUDA graphs)
onnx_embedder   the exported ONNX towers as an in-process Embedder, run by this package's own code
python_backend  Triton plumbing shared by every model_repository/<name>/1/model.py
gallery         the served gallery: installing a new one as a new `knn` version, checking it at load
server          launcher for the bundled tritonserver (`mimsearch serve`)

May import: `mim.model` (configs, towers, preprocessing, tokenizers), `mim.search` (kNN, ranking, the
embedder interface) and the top-level helpers; nothing else under `mim` imports it.
"""
