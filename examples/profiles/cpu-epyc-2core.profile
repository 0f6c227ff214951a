# Device profile: the development machine (2 cores of an AMD EPYC, AVX-512, 24 GiB).
# Measured on 2026-11-26 with numpy 2.4 in a scratch virtualenv (OpenBLAS):
#   sgemm 1024x1024x1024, median of 5: 246.8 GFLOP/s (two threads)
#   elementwise multiply + add, 64 Ki floats in cache, median of 200: 15.3 GFLOP/s (one thread)
#   copy of 256 MB, median of 7: 38.6 GB/s counting read + write
name = cpu-epyc-2core
matmul_flops_per_s = 246.8e9
other_flops_per_s = 15.3e9
memory_bytes_per_s = 38.6e9
# Host memory is the device memory on a CPU: offload has nowhere faster to go.
host_bytes_per_s = 38.6e9
memory_bytes = 24e9
