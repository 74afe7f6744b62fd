"""Training: where a process computes, the optimizer, the loop and what stops it."""
