"""Triton serving support: config.pbtxt generation from the tensor contract, the bundled-server launcher, and the logic behind the python-backend models."""
