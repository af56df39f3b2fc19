"""Tensor, pipeline, expert and data parallelism on Megatron-core, and the V4 optimizers (Muon + AdamW).

"spec N.M" in this package is section N.M of ``docs/deepseek-v4.md``; "R" is the V4 technical report.
"""

from v4train.parallel.megatron_compat import import_megatron_core

import_megatron_core()  # first, before any module of this package imports Megatron-core (megatron_compat.py)
