"""minivit's benchmark harness: ops and models on NumPy, CuPy and PyTorch eager (see README)."""
