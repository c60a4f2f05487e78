"""Small helpers shared by the entry points (train.py, generate.py)."""
