"""Triton kernels for V4 sparse attention and the Lightning Indexer, with torch references.

Empty until the kernels issue (issue 4) lands: the first-cut model computes sliding-window attention
with its own torch path in ``model/attention.py``.
"""
