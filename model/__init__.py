"""DeepSeek-V4 model modules: config and presets, hybrid CSA/HCA/SWA attention with the Lightning Indexer,
mHC, DeepSeekMoE, MTP, pipeline stages and the size calculator. "spec N.M" in this package is section N.M
of ``docs/deepseek-v4.md``; "R" is the V4 technical report, "OC" the official inference code.

Files: ``config`` (ModelConfig, presets), ``layout`` (visibility rules: windows, documents, compressed
blocks), ``compressor``,
``indexer``, ``attention``, ``rope``, ``norm``, ``mhc``, ``moe``, ``block``, ``mtp``, ``transformer``
(V4Stage), ``budget`` (parameter counts, KV cache, attention FLOPs, V3.2 baseline).
"""

from v4train.model.config import ModelConfig
from v4train.model.transformer import V4Stage, stage_layer_ranges

__all__ = ["ModelConfig", "V4Stage", "stage_layer_ranges"]
