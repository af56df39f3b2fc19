"""DeepSeek-V4 model modules: config and presets, attention, mHC, MoE, pipeline stages (DESIGN section 5)."""

from model.config import ModelConfig
from model.transformer import V4Stage, stage_layer_ranges

__all__ = ["ModelConfig", "V4Stage", "stage_layer_ranges"]
