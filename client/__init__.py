"""The gRPC client of the Triton ensembles and the search service/CLI built on it."""
