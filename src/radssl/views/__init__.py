"""Batched, on-device augmentations and positive-pair view policies."""
