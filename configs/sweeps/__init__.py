"""Sweep files for `launch/sweep.py`: each defines `get_sweep()` -> a list of override dicts.

Build the list with `e2e_vlp.sweep.axis`, `product` and `zip_`; field names are dotted
paths into the config given with `--config` (`optim.lr`, `train.seed`, ...).
"""
