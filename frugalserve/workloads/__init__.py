"""Real data sets and reference models for the seed workloads (image, text, recommendation)."""
