"""Benchmarks: perf_analyzer latency/throughput, kNN against faiss, retrieval quality."""

from mim.errors import MimFailure


class BenchError(MimFailure):
    """Base of the benchmarks' errors: a benchmark that cannot run (no server, no tool); nothing is written."""
