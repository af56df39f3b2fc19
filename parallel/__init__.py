"""Tensor, pipeline, expert and data parallelism on Megatron-core, and the V4 optimizers (Muon + AdamW).

"spec N.M" in this package is section N.M of ``docs/deepseek-v4.md``; "R" is the V4 technical report.
"""
