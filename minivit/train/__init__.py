"""Training jobs (``minivit train vit|hybrid|vilt``), evaluation and prediction; ``common`` holds
what they share (run folders, progress, metrics, curves, resumable checkpoints)."""
