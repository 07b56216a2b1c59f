"""Kernel sources (.metal and their .cu twins), read by mlx_kvcache.kernels."""
