"""Training of SiT / DFM-SiT: config, data order, EMA, checkpoints, logging, previews, the loop.

`train.py` is the entry point; `training.loop.train(cfg)` runs one process's share of a run.
"""
