"""Stage 3, probe: ERF maps from one forward and batched input-only backwards, with the
model, its buffers and every random stream left exactly as they were."""
