"""Benchmarks: training and sampling throughput, MFU, peak memory, data-loader throughput."""
