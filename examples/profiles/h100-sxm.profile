# Device profile: NVIDIA H100 SXM5 80 GB, from NVIDIA's published datasheet peaks (dense, no
# sparsity). f32 models run their products as TF32 on tensor cores.
#   TF32 tensor core: 494.7 TFLOP/s; FP32 (CUDA cores): 66.9 TFLOP/s;
#   HBM3: 3.35 TB/s; PCIe Gen5 x16 to the host: 64 GB/s per direction; 80 GB.
name = h100-sxm
matmul_flops_per_s = 494.7e12
other_flops_per_s = 66.9e12
memory_bytes_per_s = 3.35e12
host_bytes_per_s = 64e9
memory_bytes = 80e9
