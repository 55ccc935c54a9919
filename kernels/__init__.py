"""Triton kernels and their torch references (installed as raas_batch.kernels)."""
