"""Stage 5, monitor: options, schedule, probe batch, history, alerts and their agreement across
ranks, the end-of-training summary, and ``watch()`` for plain loops."""
