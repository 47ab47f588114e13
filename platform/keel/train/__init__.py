"""Distributed training on Ray Train: the MLP, its per-worker loop and the trainer."""
