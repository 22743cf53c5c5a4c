"""Stage 4, measure: ERF maps to numbers. Pure functions (mass extent, moments, Gaussian fits,
shape diagnostics, bootstrap intervals) and the result types that carry them."""
