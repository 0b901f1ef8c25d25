"""Benchmarks: perf_analyzer latency/throughput, kNN against faiss, retrieval quality."""
