"""Probe inputs: the image tensor in whatever a loader yields, the first items of a loader read
without disturbing it, and real images preprocessed as a model expects."""
