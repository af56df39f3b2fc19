"""DeepSeek-V4 model configuration: one kw-only dataclass plus the named presets.

Field names follow the official inference ``ModelArgs`` (spec section 0, "OC") where one exists, so a
V4 ``config.json`` maps onto this class almost 1:1 (``window`` is OC's ``window_size``, ``rope_factor``
/ ``original_seq_len`` / ``beta_fast`` / ``beta_slow`` are the YaRN fields, ``mtp_depth`` is
``num_nextn_predict_layers``). Presets: ``flash`` and ``pro`` carry the official values (spec section 1);
``nano`` and ``small`` are the CPU-scale models of spec section 10.1.

``__post_init__`` only validates: it raises ValueError naming the field and the fix and never rewrites a
field, so a config always means what its file says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig", "PRESET_NAMES"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and balancing hyperparameters of a DeepSeek-V4-style model (spec sections 1-5).

    Sizes are counts; ``*_theta`` are RoPE bases; eps values are added inside square roots or to
    normalisers. Raises ValueError (naming the field) when a value or a combination is invalid.
    """

    # trunk
    vocab_size: int
    dim: int
    n_layers: int
    mtp_depth: int
    compress_ratios: tuple[int, ...]  # one per layer, then one per MTP block; 0 = SWA, 4 = CSA, other = HCA
    # attention (spec 3.1)
    n_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    # lightning indexer (spec 3.3; built in CSA layers, i.e. compress ratio 4)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    # MoE (spec 5.1, 5.2)
    n_routed_experts: int
    n_activated_experts: int
    n_shared_experts: int
    moe_inter_dim: int
    n_hash_layers: int
    route_scale: float
    swiglu_limit: float  # 0 disables the clamp
    bias_update_speed: float = 0.001
    balance_loss_weight: float = 1e-4
    # mHC (spec 4)
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # norms and RoPE (spec 3.8); YaRN is on for compressed layers iff original_seq_len > 0
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 0
    beta_fast: int = 32
    beta_slow: int = 1
    # initialisation (spec 7 "Init std": V3 used 0.006; the tiny presets use 0.02, spec 10.2)
    init_std: float = 0.006
    # quantisation-aware training (model/quant.py): FP8 KV, FP4 indexer, FP4->FP8 routed-expert weights
    qat: bool = False

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            _check_int(name, getattr(self, name), minimum=1)
        for name in _NON_NEGATIVE_INTS:
            _check_int(name, getattr(self, name), minimum=0)
        for name in _POSITIVE_FLOATS:
            _check_float(name, getattr(self, name), positive=True)
        for name in _NON_NEGATIVE_FLOATS:
            _check_float(name, getattr(self, name), positive=False)
        self._check_attention()
        self._check_moe()
        self._check_schedule()
        if self.rope_factor < 1:
            _fail("rope_factor", f"is {self.rope_factor}", "use a YaRN factor >= 1 (1 = no scaling)")
        if self.qat:
            self._check_qat()
        if self.original_seq_len > 0 and not self.beta_fast > self.beta_slow > 0:
            _fail("beta_fast", f"({self.beta_fast}) must exceed beta_slow ({self.beta_slow}) > 0 with YaRN on",
                  "use the official 32 and 1")

    def _check_attention(self) -> None:
        if self.rope_head_dim % 2:
            _fail("rope_head_dim", f"is {self.rope_head_dim}", "use an even number (RoPE rotates pairs)")
        if self.rope_head_dim > self.head_dim:
            _fail("rope_head_dim", f"({self.rope_head_dim}) exceeds head_dim ({self.head_dim})",
                  "lower rope_head_dim or raise head_dim")
        if self.rope_head_dim > self.index_head_dim:
            _fail("index_head_dim", f"({self.index_head_dim}) is below rope_head_dim ({self.rope_head_dim})",
                  "the indexer ropes its last rope_head_dim dims; raise index_head_dim")
        if self.n_heads % self.o_groups:
            _fail("o_groups", f"({self.o_groups}) does not divide n_heads ({self.n_heads})",
                  "choose o_groups among the divisors of n_heads")

    def _check_qat(self) -> None:
        # the blocks of model/quant.py: FP8 per 64 KV dims, FP4 per 32 (indexer, expert inputs), Hadamard
        if (self.head_dim - self.rope_head_dim) % 64:
            _fail("qat", f"needs head_dim - rope_head_dim ({self.head_dim - self.rope_head_dim}) a multiple of 64",
                  "the FP8 KV blocks are 64 dims")
        e = self.index_head_dim
        if e % 32 or e & (e - 1):
            _fail("qat", f"needs index_head_dim ({e}) a power of two >= 32", "the Hadamard rotation and FP4 blocks")
        if self.dim % 32 or self.moe_inter_dim % 32:
            _fail("qat", f"needs dim ({self.dim}) and moe_inter_dim ({self.moe_inter_dim}) multiples of 32",
                  "the FP4 expert tiles are 1x32")

    def _check_moe(self) -> None:
        if self.n_activated_experts > self.n_routed_experts:
            _fail("n_activated_experts", f"({self.n_activated_experts}) exceeds n_routed_experts "
                  f"({self.n_routed_experts})", "lower n_activated_experts")
        if self.n_hash_layers > self.n_layers:
            _fail("n_hash_layers", f"({self.n_hash_layers}) exceeds n_layers ({self.n_layers})",
                  "use at most n_layers hash-routed layers")

    def _check_schedule(self) -> None:
        ratios = self.compress_ratios
        if not isinstance(ratios, (tuple, list)):
            _fail("compress_ratios", f"is a {type(ratios).__name__}", "give a list of ints")
        expected = self.n_layers + self.mtp_depth
        if len(ratios) != expected:
            _fail("compress_ratios", f"has {len(ratios)} entries",
                  f"give n_layers + mtp_depth = {expected} entries (one per layer, then one per MTP block)")
        for i, ratio in enumerate(ratios):
            if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 0:
                _fail("compress_ratios", f"entry {i} is {ratio!r}", "use 0 (SWA), 4 (CSA) or m' > 4 (HCA)")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset ``name`` (one of PRESET_NAMES) with ``overrides`` applied.

        Raises ValueError for an unknown preset or override key, or when the result does not validate.
        """
        if name not in _PRESETS:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict of every field (``compress_ratios`` as a list)."""
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`. Raises ValueError naming unknown or missing keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {', '.join(unknown)}; "
                             f"known fields: {', '.join(sorted(known))}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"ModelConfig: missing field(s) {', '.join(missing)}")
        values = dict(d)
        if isinstance(values["compress_ratios"], list):
            values["compress_ratios"] = tuple(values["compress_ratios"])
        return cls(**values)


_POSITIVE_INTS = (
    "vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank", "o_groups",
    "o_lora_rank", "window", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
    "n_activated_experts", "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters",
)
_NON_NEGATIVE_INTS = ("mtp_depth", "n_shared_experts", "n_hash_layers", "original_seq_len", "beta_fast", "beta_slow")
_POSITIVE_FLOATS = ("route_scale", "hc_eps", "norm_eps", "rope_theta", "compress_rope_theta", "init_std")
_NON_NEGATIVE_FLOATS = ("swiglu_limit", "bias_update_speed", "balance_loss_weight", "rope_factor")


def _fail(field: str, problem: str, fix: str) -> None:
    raise ValueError(f"ModelConfig.{field} {problem}: {fix}")


def _check_int(field: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"is {value!r} ({type(value).__name__})", "give an int")
    if value < minimum:
        _fail(field, f"is {value}", f"give an int >= {minimum}")


def _check_float(field: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"is {value!r} ({type(value).__name__})", "give a number")
    if value < 0 or (positive and value == 0):
        _fail(field, f"is {value}", "give a number > 0" if positive else "give a number >= 0")


# Spec section 10.1: every mechanism on, at CPU scale. YaRN stays off (original_seq_len 0); when switched
# on for the 4096 stage the spec suggests factor 4 over L_orig 1024, hence rope_factor 4.
_NANO = dict(
    vocab_size=8192, dim=192, n_layers=4, mtp_depth=1, compress_ratios=(0, 4, 32, 4, 0),
    n_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=96, o_groups=2, o_lora_rank=96, window=32,
    index_n_heads=4, index_head_dim=32, index_topk=16,
    n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=192, n_hash_layers=1,
    route_scale=1.0, swiglu_limit=10.0,
    rope_factor=4.0, original_seq_len=0, init_std=0.02,
)
_SMALL = dict(
    _NANO, dim=256, n_layers=6, compress_ratios=(0, 4, 32, 4, 32, 4, 0),
    head_dim=128, rope_head_dim=32, q_lora_rank=128, o_lora_rank=128, index_head_dim=64,
    n_routed_experts=16, moe_inter_dim=256,
)
# Spec section 1 (official config.json values); Flash: [0,0] + [4,128]x20 + [4] + MTP [0].
_FLASH = dict(
    vocab_size=129280, dim=4096, n_layers=43, mtp_depth=1, compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0),
    n_heads=64, head_dim=512, rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, window=128,
    index_n_heads=64, index_head_dim=128, index_topk=512,
    n_routed_experts=256, n_activated_experts=6, n_shared_experts=1, moe_inter_dim=2048, n_hash_layers=3,
    route_scale=1.5, swiglu_limit=10.0,
    rope_factor=16.0, original_seq_len=65536, init_std=0.006,
)
# Pro: [128,128] + [4,128]x29 + [4] + MTP [0].
_PRO = dict(
    _FLASH, dim=7168, n_layers=61, compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
    n_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
    n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5,
)
_PRESETS: dict[str, dict[str, Any]] = {"nano": _NANO, "small": _SMALL, "flash": _FLASH, "pro": _PRO}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)
