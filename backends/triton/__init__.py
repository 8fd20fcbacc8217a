"""Portable Triton kernels shared by CUDA, ROCm and XPU (attention, fused element-wise ops)."""
