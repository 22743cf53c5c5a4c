"""Foundations every stage shares: error types, warnings at the user's line, optional-package
flags, isolation of random streams and buffers, the model's device, one value per dim, one-line
hints for failing models, and the ERF conventions ("modes")."""
