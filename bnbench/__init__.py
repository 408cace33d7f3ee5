"""bnbench: the benchmarking harness for the kernels in `kernels`."""
