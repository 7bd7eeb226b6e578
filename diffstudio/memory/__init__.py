"""Memory: what a model needs (estimate.py), what to do about it (planner.py), and measuring it (measure.py).

Read docs/memory.md for the rules and the measured numbers."""
