"""Per-layer cost model of a training step, and the pipeline split that balances it (``parallel.stage_layers``).

A pipeline stage's step time is modelled as the sum of its components' times: the embedding (first stage),
each block, and the output head with its loss and the MTP blocks (last stage). One component's time over one
sequence of S tokens is linear in six features, each summed over the component's modules:

* ``matmul``     6 x S x the parameters one token multiplies (FLOPs, forward + backward; spec 10.1 counting);
* ``attention``  the attention cores' and Lightning Indexer's FLOPs (``model.budget.attention_core_flops``);
* ``streams``    S x hc_mult x dim, the elements the mHC read, Sinkhorn and write touch (spec 2.2);
* ``vocab``      S x vocab_size, the loss's softmax over the vocabulary;
* ``modules``    1 per block, head or embedding (per-module overhead, which dominates small models on CPU);
* ``experts``    the routed experts of a block (each runs as its own call on its slice of the tokens).

The coefficients (seconds per unit) are measured per device kind by ``benchmarks/stage_balance.py
--calibrate``, which times single-layer stages of the ``nano`` and ``small`` models on that device and fits them
by non-negative least squares; they are kept in ``stage_calibration.json`` beside this module. A device kind
without a calibration counts FLOPs alone (``matmul`` and ``attention`` at 1, the others at 0), and says so.

:func:`balanced_stage_layers` cuts the layers into contiguous stages minimising the slowest stage's predicted
time (exact, dynamic programming), the split ``parallel.stage_layers: auto`` runs. Tensor, context and expert
parallelism divide every stage's work alike, so the split depends only on the model, the number of stages,
the sequence length, the attention mode and the device kind: a pure function every rank computes alike.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from v4train.model.budget import layer_params, attention_core_flops
from v4train.model.config import ModelConfig

__all__ = ["FEATURES", "Calibration", "StageCosts", "balanced_stage_layers", "component_features", "job_stage_layers",
           "load_calibration", "resolve_stage_layers", "stage_costs"]

FEATURES = ("matmul", "attention", "streams", "vocab", "modules", "experts")
CALIBRATION_FILE = Path(__file__).with_name("stage_calibration.json")


@dataclass(frozen=True)
class Calibration:
    """Seconds per unit of each feature on one device kind; ``source`` says where they come from."""

    device: str
    coefficients: dict[str, float]
    source: str

    def seconds(self, features: dict[str, float]) -> float:
        return sum(self.coefficients.get(k, 0.0) * v for k, v in features.items())


def load_calibration(device: str, flops_per_s: float = 1.0, path: Path = CALIBRATION_FILE) -> Calibration:
    """The calibration of device kind ``device`` ("cpu" or "gpu") from ``path``; when it has none, FLOPs alone
    at ``flops_per_s`` (matmul and attention FLOPs over that rate, the other features free).

    Raises ValueError naming the file when it is not valid JSON or a coefficient is missing or negative."""
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    entry = table.get(device)
    if entry is None:
        return Calibration(device, {"matmul": 1.0 / flops_per_s, "attention": 1.0 / flops_per_s},
                           f"no calibration for {device}: FLOPs alone at {flops_per_s:.3g} FLOP/s")
    coefficients = entry.get("coefficients", {})
    for name in FEATURES:
        if not isinstance(coefficients.get(name), (int, float)) or coefficients[name] < 0:
            raise ValueError(f"{path}: {device}.coefficients.{name} must be a number >= 0, "
                             f"got {coefficients.get(name)!r}")
    return Calibration(device, {k: float(coefficients[k]) for k in FEATURES}, entry.get("measured", str(path)))


def _block_features(cfg: ModelConfig, ratio: int, seq_len: int, mode: str, extra_params: int = 0) -> dict:
    fixed, expert = layer_params(cfg, ratio)
    params = fixed + cfg.n_activated_experts * expert + extra_params
    return {"matmul": 6.0 * seq_len * params, "attention": attention_core_flops(cfg, ratio, seq_len, mode),
            "streams": float(seq_len * cfg.hc_mult * cfg.dim), "vocab": 0.0, "modules": 1.0,
            "experts": float(cfg.n_routed_experts)}


def _add(*parts: dict) -> dict:
    return {k: sum(p.get(k, 0.0) for p in parts) for k in FEATURES}


@functools.lru_cache(maxsize=256)  # the planner asks for the same model and shape once per layout it tries
def component_features(cfg: ModelConfig, seq_len: int, mode: str) -> tuple[dict, list[dict], dict]:
    """``(embedding, [block 0 .. n_layers-1], head)`` features (cached and shared: never modify them) of one
    sequence of ``seq_len`` tokens in attention mode ``mode``; ``head`` is the hyper-connection head, the norm,
    the vocabulary projection with its loss and every MTP block with its pass through the shared head."""
    S, D, N, V = seq_len, cfg.dim, cfg.hc_mult, cfg.vocab_size
    embed = {"matmul": 0.0, "attention": 0.0, "streams": float(S * N * D), "vocab": 0.0, "modules": 1.0,
             "experts": 0.0}
    blocks = [_block_features(cfg, cfg.compress_ratios[i], S, mode) for i in range(cfg.n_layers)]
    head_params = N * N * D + N + 1 + D + V * D                    # hc_head, norm, head (model.budget)
    head = {"matmul": 6.0 * S * head_params, "attention": 0.0, "streams": float(S * N * D),
            "vocab": float(S * V), "modules": 1.0, "experts": 0.0}
    # an MTP block: a block, its projections, hc head and norms (model.budget), and a pass through the shared head
    mtp_params = 2 * D * D + 3 * D + N * N * D + N + 1 + V * D
    on_head = {"streams": float(S * N * D), "vocab": float(S * V), "modules": 1.0}
    mtp = [_add(_block_features(cfg, ratio, S, mode, extra_params=mtp_params), on_head)
           for ratio in cfg.compress_ratios[cfg.n_layers:]]
    return embed, blocks, _add(head, *mtp)


@dataclass(frozen=True)
class StageCosts:
    """Predicted seconds per sequence of each component, on one device kind."""

    embed: float
    blocks: tuple[float, ...]
    head: float
    calibration: Calibration

    def of_stages(self, stage_layers: list[int]) -> list[float]:
        """Predicted seconds per sequence of each (virtual) stage of a split (layers per stage, in order)."""
        out, start = [], 0
        for s, n in enumerate(stage_layers):
            cost = sum(self.blocks[start:start + n])
            cost += (self.embed if s == 0 else 0.0) + (self.head if s == len(stage_layers) - 1 else 0.0)
            out.append(cost)
            start += n
        return out


def stage_costs(cfg: ModelConfig, seq_len: int, mode: str, calibration: Calibration) -> StageCosts:
    """The components' predicted seconds per sequence of ``seq_len`` tokens under ``calibration``."""
    embed, blocks, head = component_features(cfg, seq_len, mode)
    return StageCosts(calibration.seconds(embed), tuple(calibration.seconds(b) for b in blocks),
                      calibration.seconds(head), calibration)


def balanced_stage_layers(costs: StageCosts, n_stages: int) -> list[int]:
    """Layers per stage (contiguous, each >= 1, summing to n_layers) minimising the slowest stage's predicted
    time; among equal optima, the earliest stages take the most layers. Raises ValueError unless
    1 <= n_stages <= n_layers."""
    n = len(costs.blocks)
    if not 1 <= n_stages <= n:
        raise ValueError(f"{n_stages} pipeline stages need between 1 and n_layers ({n}): each stage needs a layer")
    prefix = [0.0]
    for c in costs.blocks:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:  # stage s holding layers a..b-1
        return (prefix[b] - prefix[a] + (costs.embed if s == 0 else 0.0)
                + (costs.head if s == n_stages - 1 else 0.0))

    # best[s][j]: (slowest stage, split) of layers j.. over stages s.. ; filled from the last stage back
    best: list[dict[int, tuple[float, list[int]]]] = [{} for _ in range(n_stages)]
    for j in range(n_stages - 1, n):
        best[n_stages - 1][j] = (cost(n_stages - 1, j, n), [n - j])
    for s in range(n_stages - 2, -1, -1):
        for j in range(s, n - (n_stages - 1 - s)):
            choice = None
            for b in range(n - (n_stages - 1 - s), j, -1):  # most layers first: ties keep the earliest-heavy split
                rest, split = best[s + 1][b]
                worst = max(cost(s, j, b), rest)
                if choice is None or worst < choice[0]:
                    choice = (worst, [b - j] + split)
            best[s][j] = choice
    return best[0][0][1]


def resolve_stage_layers(stage_layers, cfg: ModelConfig, n_stages: int, seq_len: int, mode: str,
                         device: str) -> list[int]:
    """Layers per (virtual) stage: ``stage_layers`` itself when it is a list, else the balanced split for
    ``device``'s calibration at ``seq_len`` tokens in attention mode ``mode``."""
    if stage_layers != "auto":
        return list(stage_layers)
    return list(_balanced(cfg, n_stages, seq_len, mode, device))


@functools.lru_cache(maxsize=1024)
def _balanced(cfg: ModelConfig, n_stages: int, seq_len: int, mode: str, device: str) -> tuple[int, ...]:
    return tuple(balanced_stage_layers(stage_costs(cfg, seq_len, mode, load_calibration(device)), n_stages))


def job_stage_layers(job, cfg: ModelConfig, device: str) -> list[int]:
    """Layers per (virtual) pipeline stage of ``job`` (its ``parallel.stage_layers``) on device kind ``device``
    ("cpu" or "gpu"), balanced at :meth:`JobSpec.sequence_for_costs`."""
    seq_len, mode = job.sequence_for_costs()
    p = job.parallel
    return resolve_stage_layers(p.stage_layers, cfg, p.pp * p.vp, seq_len, mode, device)
