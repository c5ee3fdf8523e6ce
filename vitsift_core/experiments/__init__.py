"""Experiments: the analysis suite, mask-eval, pre-training, probe, recovery."""
