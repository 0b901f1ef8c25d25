"""Triton serving support.

repository      config.pbtxt generation from the tensor contract (`python -m mim.serving.repository`)
backends        the logic behind the python-backend models (NumPy / ONNX Runtime, tested without Triton)
python_backend  Triton plumbing shared by every model_repository/<name>/1/model.py
server          launcher for the bundled tritonserver (`python -m mim.serving.server`)
"""
