"""The device check: one script, one GPU, under 8 minutes on an H200; one JSON and one markdown table.

Sections (each catches its own exception, records it with the traceback's last lines, and the next runs;
the JSON and the table are rewritten after every measurement, so a run cut short still returns what it
measured). They run in this order, the figures that matter most first:

1. ``environment``: device name, driver, CUDA, and the torch / triton / numpy / megatron-core / pydantic /
   transformer-engine versions.
2. ``kernels`` at T = 64k: the Triton sparse attention (forward, forward + backward) and indexer top-k at
   V4-Flash attention shapes (H = 64, D = 512, W = 128, top-512 of T/4 compressed entries, indexer
   64 x 128) through ``benchmarks/kernels_gpu.py`` (imported, not copied): time and TFLOP/s.
3. ``train``, ``train.precision: bf16`` with FP8 off, then on: the ``small`` preset on one device through
   ``orchestrator.launch`` in this process (the torchrun path: the real Supervisor and RankTrainer, no
   Ray). Per run: the loss of every step, the median step time and tokens/s after the warm-up steps, MFU
   against the device's dense BF16 peak with :func:`model.budget.training_flops_per_sequence` (the sparse
   attention's real picked entries), and the peak CUDA memory against ``v4train plan``'s prediction for
   the layout and precision. FP8 on GPU needs Transformer Engine: without it the run must fail at start
   with one line, which is recorded.
4. ``kernels`` at T = 4k, 16k, 32k: as 2, plus errors against the torch reference (T <= 8k, memory;
   within the interpreter tests' bf16 tolerance, 2e-2 of max(1, |reference|)) and time against compiled
   FlexAttention on the same picks (T <= 16k, each T a fresh compile: Flex computes every picked block
   for a whole query block, seconds at 64k).
5. ``sweep``: the launch-configuration sweep of the sparse-attention kernels
   (``benchmarks/sparse_attention_configs.py``'s ``sweep``) at T = 16k and 64k.
6. ``train`` in fp32 with FP8 off: the baseline the bf16 losses are compared with.

Time on an H200, estimated (nothing of it was measured yet) from the probe's kernel figures (64k: indexer
45 ms, forward 57 ms, forward + backward 650 ms) and a Triton compile of a few seconds per kernel: 2, about
1 min (compiles, then 4 runs of each); each ``small`` run (2.3 TFLOP per step, 6 steps) well under 1 min
after its first compiles; 4, about 2 min (FlexAttention compiles, 12 s of Flex backward at 16k); 5, about
1.5 min (10 candidates compiled once, 4 runs each at 2 lengths); 6, under 1 min: 6 to 7 minutes in all.
``--budget-s`` (default 420) guards the 8 minutes: a part that would start after it is recorded as
skipped, not run.

``--device cpu`` runs the same logic end to end at tiny sizes, the kernels and the sweep under
``TRITON_INTERPRET=1`` (set by the script; the training step takes the torch kernels there, the
interpreter would make it minutes long) and FlexAttention left out (its CPU compile alone takes minutes):
the test that keeps this script working (``tests/kernels/test_gpu_check.py``). Without an installed
v4train (the device machine's Python is newer than ``requires-python``) the script imports the
repository through a temporary ``v4train/`` folder of symlinks to its top-level packages.

    python benchmarks/gpu_check.py --out runs/gpu_check                 # on the GPU (make gpu-check OUT=...)
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu_check    # the logic, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "parallel", "kernels", "data", "orchestrator")
BF16_TOL = 2e-2                     # tests/kernels/test_kernels_{attention,indexer}.py, relative to max(1, |ref|)
H200_BF16_PEAK_TFLOPS = 989.0       # dense BF16, H100/H200 SXM (clusters/h200-*.yaml)
SECTIONS = ("environment", "kernels", "train", "sweep")


def ensure_importable() -> str:
    """Make ``import v4train.<package>`` work; returns how (``installed`` or the symlink folder)."""
    try:
        importlib.import_module("v4train.kernels")
        return "installed"
    except ImportError:
        pass
    root = Path(tempfile.mkdtemp(prefix="v4train-import-"))
    (root / "v4train").mkdir()
    for name in PACKAGES:
        (root / "v4train" / name).symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    importlib.import_module("v4train.kernels")
    return str(root)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help="which sections run (always in the module docstring's order)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="kernel T values (cuda: 64k first, then 4k, 16k, 32k; "
                                                           "cpu: 64)")
    p.add_argument("--sweep-seq-lens", type=int, nargs="+", help="sweep T values (cuda: 16k, 64k; cpu: 32)")
    p.add_argument("--train-steps", type=int, help="training steps per run (cuda: 6; cpu: 2); the first "
                                                   "ones are warm-up")
    p.add_argument("--budget-s", type=float, help="seconds after which no further part starts (cuda: 420; cpu: none)")
    return p.parse_args(argv)


class Report:
    """The JSON record and its markdown table, rewritten after every change."""

    def __init__(self, out: Path, device: str) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"device_arg": device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
        self.cache: dict = {}   # what later parts reuse (the training data), not written out

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})

    def error(self, where: dict, exc: BaseException) -> None:
        where["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
        where["traceback"] = traceback.format_exc().splitlines()[-12:]

    def write(self) -> None:
        self.data["written"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.data))


# ------------------------------------------------------------------------------------------ environment

def environment(device: str) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "import": ensure_importable()}
    for dist_name in ("triton", "numpy", "megatron-core", "pydantic", "transformer-engine", "ray"):
        try:
            env[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            env[dist_name] = None
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as exc:
            env["driver"] = f"nvidia-smi failed: {exc}"
    else:
        env["device"] = "cpu (Triton interpreter)"
    return env


# ------------------------------------------------------------------------------------------ kernels

def kernel_args(device: str, seq_lens=None):
    """``benchmarks/kernels_gpu.py`` and its arguments for this device (V4-Flash shapes on CUDA, tiny on CPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kernels_gpu

    if device == "cuda":
        argv = ["--seq-lens", *map(str, seq_lens or [65536, 4096, 16384, 32768]), "--repeats", "3",
                "--ref-max-t", "8192", "--flex-max-t", "16384"]
    else:   # FlexAttention's CPU compile alone takes minutes on a small machine: the GPU runs it
        argv = ["--device", "cpu", "--seq-lens", *map(str, seq_lens or [64]), "--heads", "2", "--head-dim", "32",
                "--window", "16", "--topk", "8", "--indexer-heads", "2", "--indexer-dim", "16", "--repeats", "1",
                "--ref-max-t", "64", "--no-flex"]
    return kernels_gpu, kernels_gpu.parse_args(argv)


def kernels_section(report: Report, device: str, seq_lens: list[int]) -> None:
    """Rows for the lengths ``seq_lens``, added to the section's rows (the table sorts them by T)."""
    import torch

    sec = report.section("kernels")
    kernels_gpu, args = kernel_args(device, seq_lens)
    sec["shape"] = {k: getattr(args, k) for k in ("batch", "heads", "head_dim", "window", "ratio", "topk",
                                                   "indexer_heads", "indexer_dim", "dtype", "repeats")}
    sec.setdefault("rows", [])
    dev = torch.device(device)
    for T in args.seq_lens:
        row = {"T": T}
        sec["rows"].append(row)
        try:
            row.update(kernels_gpu.run_one(args, T, dev))
            if "err_ref" in row:
                row["within_tol"] = [e <= BF16_TOL * max(1.0, s) for e, s in zip(row["err_ref"], row["ref_scale"])]
        except Exception as exc:  # noqa: BLE001 - recorded; the next T runs
            report.error(row, exc)
        if device == "cuda":
            torch.cuda.empty_cache()
        report.write()


# ------------------------------------------------------------------------------------------ sweep

def sweep_section(report: Report, device: str, seq_lens: list[int] | None) -> None:
    """The launch-configuration sweep (``benchmarks/sparse_attention_configs.py``) at the kernel section's
    shapes: one row per candidate and length (ms, TFLOP/s, difference from the default configuration)."""
    import torch

    import sparse_attention_configs

    sec = report.section("sweep")
    _, args = kernel_args(device)
    sec.setdefault("rows", [])
    for T in seq_lens or ([16384, 65536] if device == "cuda" else [32]):
        try:
            sec["rows"] += sparse_attention_configs.sweep(args, T, torch.device(device))
        except Exception as exc:  # noqa: BLE001 - recorded; the next T runs
            report.error(sec.setdefault("errors", {}).setdefault(str(T), {}), exc)
        if device == "cuda":
            torch.cuda.empty_cache()
        report.write()


# ------------------------------------------------------------------------------------------ train

def _documents(device: str) -> list[str]:
    """Offline English text: the docstrings of standard-library modules and their members (a few on CPU,
    whose tiny runs read a few thousand tokens)."""
    import inspect

    names = ["argparse", "collections", "contextlib", "dataclasses", "functools", "itertools", "json", "logging",
             "pathlib", "re", "subprocess", "textwrap", "threading", "unittest", "urllib.request", "typing",
             "asyncio", "email", "http.client", "decimal", "fractions", "statistics", "datetime", "os", "shutil"]
    if device == "cpu":
        names = names[:4]
    docs = []
    for name in names:
        mod = importlib.import_module(name)
        parts = [inspect.getdoc(mod) or ""]
        for _, obj in inspect.getmembers(mod):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                parts.append(inspect.getdoc(obj) or "")
        docs.append("\n\n".join(p for p in parts if p))
    return docs


def train_config(device: str, steps: int | None) -> dict:
    if device == "cuda":
        return dict(seq_len=2048, global_batch=16, micro_batch_size=4, steps=steps or 6, warmup=2, vocab=8192)
    return dict(seq_len=64, global_batch=2, micro_batch_size=1, steps=steps or 2, warmup=1, vocab=512)


def write_job(work: Path, dataset: Path, tc: dict, precision: str, fp8: bool, device: str) -> tuple[Path, Path]:
    import yaml

    job = {
        "name": f"gpu-check-{precision}-{'fp8' if fp8 else 'base'}", "seed": 1234,
        "model": {"preset": "small"},
        "data": {"path": str(dataset), "seq_len": tc["seq_len"]},
        "train": {"steps": tc["steps"], "global_batch": tc["global_batch"], "micro_batch_size": tc["micro_batch_size"],
                  "lr": 1e-3, "warmup_steps": 1, "eval_batches": 0, "fp8": fp8,
                  "precision": precision},
        "parallel": {"tp": 1, "pp": 1, "ep": 1, "dp": 1},
        "checkpoint": {"every_steps": 0, "at_end": False},
        "spike_guard": {"enabled": False},
        "curriculum": {"stages": [{"seq_len": tc["seq_len"], "attention": "sparse"}],
                       "batch_multiple": tc["global_batch"]},
    }
    gpu = device == "cuda"
    cluster = {"name": "gpu-check", "devices_per_node": 1, "device": "gpu" if gpu else "cpu", "simulated": not gpu,
               "backend": "nccl" if gpu else "gloo", "collective_timeout_s": 600,
               "hardware": {"memory_gb": 141, "peak_tflops": H200_BF16_PEAK_TFLOPS, "fp8": fp8} if gpu else {}}
    job_path, cluster_path = work / f"{job['name']}.yaml", work / "cluster.yaml"
    job_path.write_text(yaml.safe_dump(job, sort_keys=False))
    cluster_path.write_text(yaml.safe_dump(cluster, sort_keys=False))
    return job_path, cluster_path


def planned_peak_gib(job_path: Path, cluster_path: Path, vocab_size: int) -> float:
    """``v4train plan``'s peak memory per device (GiB) for the job's own layout."""
    from v4train.orchestrator.spec import load_cluster, load_job
    from v4train.orchestrator.tools.plan import Layout, plan_job

    job, cluster = load_job(str(job_path)), load_cluster(str(cluster_path))
    cfg = job.model.build(vocab_size=vocab_size)
    p = job.parallel
    plan = plan_job(cfg, job, cluster, Layout(p.tp, p.pp, p.ep, p.dp, job.train.micro_batch_size, cp=p.cp))
    return plan.peak.total / 2**30


def train_run(work: Path, dataset: Path, tc: dict, precision: str, fp8: bool, device: str, vocab_size: int) -> dict:
    """One in-process ``orchestrator.launch`` run; its metrics, failure line and memory."""
    import torch

    from v4train.model.budget import training_flops_per_sequence
    from v4train.orchestrator import launch
    from v4train.orchestrator.control.rendezvous import free_port

    job_path, cluster_path = write_job(work, dataset, tc, precision, fp8, device)
    run_dir = work / job_path.stem
    result = {"fp8": fp8, "precision": precision, "seq_len": tc["seq_len"],
              "global_batch": tc["global_batch"], "micro_batch_size": tc["micro_batch_size"]}
    try:
        result["planned_peak_gib"] = round(planned_peak_gib(job_path, cluster_path, vocab_size), 3)
    except Exception as exc:  # noqa: BLE001 - the run still goes ahead
        result["plan_error"] = f"{type(exc).__name__}: {exc}"[:300]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stderr = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(stderr):
        try:
            rc = launch.main([str(job_path), "--run-dir", str(run_dir), "--cluster", str(cluster_path), "--overwrite"])
        except Exception as exc:  # noqa: BLE001 - a failure at start is a result (FP8 without TE)
            rc, result["exception"] = 1, f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["exit_code"] = rc
    lines = [ln for ln in stderr.getvalue().splitlines() if ln.strip()]
    result["placement"] = next((ln.split(": ", 1)[1] for ln in lines if ln.startswith("v4train launch: device")), None)
    if rc != 0:
        result["failure_line"] = result.get("exception") or next(
            (ln for ln in reversed(lines) if "error" in ln.lower() or "fail" in ln.lower()), lines[-1] if lines else "")
    if device == "cuda":
        result["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_cuda_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    metrics_path = run_dir / "metrics.jsonl"
    steps = []
    if metrics_path.exists():
        steps = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if '"step_time_s"' in ln]
    result["losses"] = [round(m["loss"], 5) for m in steps]
    timed = [m for m in steps if m["step"] > tc["warmup"]]
    if timed:
        cfg = _built_config(job_path, vocab_size)
        step_s = statistics.median(m["step_time_s"] for m in timed)
        tokens = tc["seq_len"] * tc["global_batch"]
        flops = training_flops_per_sequence(cfg, tc["seq_len"], "sparse") * tc["global_batch"]
        result.update(step_time_s=round(step_s, 4), tokens_per_s=round(tokens / step_s, 1),
                      model_tflop_per_step=round(flops / 1e12, 4), achieved_tflops=round(flops / step_s / 1e12, 3))
        if device == "cuda":
            result["mfu_vs_bf16_peak"] = round(flops / step_s / 1e12 / H200_BF16_PEAK_TFLOPS, 5)
    return result


def _built_config(job_path: Path, vocab_size: int):
    from v4train.orchestrator.spec import load_job

    return load_job(str(job_path)).model.build(vocab_size=vocab_size)


def train_data(report: Report, device: str, steps: int | None) -> tuple[Path, Path, dict, int]:
    """The section's work folder, tokenised dataset, run sizes and vocabulary size, made on the first call."""
    from v4train.data.loader import TokenDataset
    from v4train.data.prepare import prepare_dataset

    sec = report.section("train")
    if "_data" not in report.cache:
        tc = train_config(device, steps)
        sec["config"] = tc
        work = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
        texts = work / "docs"
        texts.mkdir()
        for i, doc in enumerate(_documents(device)):
            (texts / f"{i:03d}.txt").write_text(doc)
        dataset = work / "dataset"
        prepare_dataset(dataset, inputs=sorted(texts.glob("*.txt")), vocab_size=tc["vocab"], val_fraction=0.05,
                        seed=0)
        sec["vocab_size"] = TokenDataset.open(str(dataset), "train").vocab_size
        report.cache["_data"] = (work, dataset, tc, sec["vocab_size"])
    return report.cache["_data"]


def train_section(report: Report, device: str, steps: int | None, runs: list[tuple[str, bool]]) -> None:
    """Runs ``(precision, fp8)`` added to the section's runs; then the loss comparisons the runs so far allow."""
    sec = report.section("train")
    work, dataset, tc, vocab_size = train_data(report, device, steps)
    sec.setdefault("runs", [])
    # On CPU the step takes the torch kernels: the interpreter would make it minutes long; the model's
    # training path through the Triton kernels is tested against the torch path in tests/kernels.
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        for precision, fp8 in runs:
            run = {"precision": precision, "fp8": fp8}
            sec["runs"].append(run)
            try:
                run.update(train_run(work, dataset, tc, precision, fp8, device, vocab_size))
            except Exception as exc:  # noqa: BLE001 - recorded; the next run goes ahead
                report.error(run, exc)
            report.write()
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    found = {(r["precision"], r["fp8"]): r.get("losses") for r in sec["runs"]}
    for key, a, b in (("fp8_vs_base_max_rel_loss_diff", ("bf16", False), ("bf16", True)),
                      ("bf16_vs_fp32_max_rel_loss_diff", ("fp32", False), ("bf16", False))):
        la, lb = found.get(a), found.get(b)
        if la and lb and len(la) == len(lb):
            sec[key] = max(abs(x - y) / abs(x) for x, y in zip(la, lb))


# ------------------------------------------------------------------------------------------ markdown

def _f(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(data: dict) -> str:
    s = data["sections"]
    out = [f"# gpu_check ({data['device_arg']}, started {data['started']}, written {data.get('written', '')})", ""]
    env = s.get("environment", {})
    if env:
        out += ["| environment | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()
                                                            if k != "traceback"] + [""]
    ker = s.get("kernels", {})
    if ker:
        out += [f"kernels: {ker.get('shape', '')}", "",
                "| T | K | indexer ms | same picks | triton fwd ms | triton fwd+bwd ms | TFLOP/s fwd / all | "
                "flex fwd ms | flex fwd+bwd ms | ref fwd ms | ref fwd+bwd ms | err vs ref o/dq/dkv/dsink | "
                "within bf16 tol | err vs flex | error |", "|" + "---|" * 15]
        for r in sorted(ker.get("rows", []), key=lambda r: r["T"]):
            err = "/".join(f"{e:.1e}" for e in r["err_ref"]) if "err_ref" in r else "-"
            tol = "/".join("yes" if w else "NO" for w in r["within_tol"]) if "within_tol" in r else "-"
            out.append(f"| {r['T']} | {r.get('K', '-')} | {_f(r.get('idx_ms'), '.2f')} | "
                       f"{_f(r.get('idx_same'), '.4f')} | "
                       f"{_f(r.get('tri_fwd'), '.2f')} | {_f(r.get('tri_all'), '.2f')} | "
                       f"{_f(r.get('tflops_fwd'), '.0f')} / {_f(r.get('tflops_all'), '.0f')} | "
                       f"{_f(r.get('flex_fwd'), '.2f')} | {_f(r.get('flex_all'), '.2f')} | "
                       f"{_f(r.get('ref_fwd'), '.2f')} | "
                       f"{_f(r.get('ref_all'), '.2f')} | {err} | {tol} | {_f(r.get('err_flex'), '.1e')} | "
                       f"{r.get('error') or r.get('flex_error') or ''} |")
        if ker.get("error"):
            out.append(f"\nkernels section failed: {ker['error']}")
        out.append("")
    tr = s.get("train", {})
    if tr:
        out += [f"train: `small` preset, {tr.get('config', '')}, vocab {tr.get('vocab_size', '-')}", "",
                "| fp8 | precision | losses | step s (median) | tokens/s | model TFLOP/step | TFLOP/s "
                "| MFU (bf16 peak) | peak GiB (allocated / reserved) | planned GiB | failure |", "|" + "---|" * 11]
        for r in tr.get("runs", []):
            out.append(f"| {r['fp8']} | {r.get('precision', '-')} | {r.get('losses', '-')} | "
                       f"{_f(r.get('step_time_s'), '.4f')} "
                       f"| {_f(r.get('tokens_per_s'), '.0f')} | {_f(r.get('model_tflop_per_step'), '.3f')} | "
                       f"{_f(r.get('achieved_tflops'), '.2f')} | {_f(r.get('mfu_vs_bf16_peak'), '.4f')} | "
                       f"{_f(r.get('peak_cuda_gib'), '.2f')} / {_f(r.get('peak_cuda_reserved_gib'), '.2f')} | "
                       f"{_f(r.get('planned_peak_gib'), '.2f')} | {r.get('failure_line') or r.get('error') or ''} |")
        if "fp8_vs_base_max_rel_loss_diff" in tr:
            out.append(f"\nbf16, FP8 on vs off, largest relative loss difference: "
                       f"{tr['fp8_vs_base_max_rel_loss_diff']:.2e}")
        if "bf16_vs_fp32_max_rel_loss_diff" in tr:
            out.append(f"\nbf16 vs fp32 (FP8 off), largest relative loss difference: "
                       f"{tr['bf16_vs_fp32_max_rel_loss_diff']:.2e}")
        if tr.get("error"):
            out.append(f"\ntrain section failed: {tr['error']}")
        out.append("")
    sw = s.get("sweep", {})
    if sw:
        out += ["sweep: sparse-attention launch configurations, kernels' shapes", "",
                "| T | pass | config | ms | TFLOP/s | max abs diff vs default | error |", "|" + "---|" * 7]
        for r in sw.get("rows", []):
            out.append(f"| {r['T']} | {r['kind']} | {r['config']} | {_f(r.get('ms'), '.2f')} | "
                       f"{_f(r.get('tflops'), '.0f')} | {_f(r.get('max_diff'), '.1e')} | {r.get('error', '')} |")
        for T, e in sw.get("errors", {}).items():
            out.append(f"\nsweep at T = {T} failed: {e['error']}")
        if sw.get("error"):
            out.append(f"\nsweep section failed: {sw['error']}")
        out.append("")
    parts = data.get("parts", [])
    if parts:
        out += ["| part | seconds | outcome |", "|---|---|---|"]
        out += [f"| {p['part']} | {_f(p.get('seconds'))} | {p.get('outcome', '')} |" for p in parts]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ main

def plan(args) -> list[tuple[str, str, object]]:
    """``(part name, section, call)`` in run order (module docstring), only the chosen sections."""
    cuda = args.device == "cuda"
    first, rest = (args.seq_lens[:1], args.seq_lens[1:]) if args.seq_lens else (
        ([65536], [4096, 16384, 32768]) if cuda else ([64], []))
    parts = [
        ("environment", "environment", lambda r: r.section("environment").update(environment(args.device))),
        (f"kernels T={first}", "kernels", lambda r: kernels_section(r, args.device, first)),
        ("train bf16, fp8 off", "train", lambda r: train_section(r, args.device, args.train_steps, [("bf16", False)])),
        ("train bf16, fp8 on", "train", lambda r: train_section(r, args.device, args.train_steps, [("bf16", True)])),
        (f"kernels T={rest}", "kernels", lambda r: kernels_section(r, args.device, rest)),
        ("sweep", "sweep", lambda r: sweep_section(r, args.device, args.sweep_seq_lens)),
        ("train fp32, fp8 off", "train", lambda r: train_section(r, args.device, args.train_steps, [("fp32", False)])),
    ]
    return [p for p in parts if p[1] in args.sections and p[0] != "kernels T=[]"]


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_importable()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    report = Report(Path(args.out), args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu for the logic check)",
              file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else (420.0 if args.device == "cuda" else None)
    report.data["budget_s"] = budget
    report.data["parts"] = []
    t0 = time.perf_counter()
    for part, name, call in plan(args):
        record = {"part": part}
        report.data["parts"].append(record)
        if budget is not None and time.perf_counter() - t0 > budget:
            record["outcome"] = f"skipped: past the {budget:.0f} s budget"
            report.write()
            continue
        sec = report.section(name)
        started = time.perf_counter()
        try:
            call(report)
            record["outcome"] = "done"
        except Exception as exc:  # noqa: BLE001 - recorded; the next part runs
            report.error(sec, exc)
            record["outcome"] = f"failed: {sec['error']}"
        record["seconds"] = round(time.perf_counter() - started, 1)
        sec["section_s"] = round(sec.get("section_s", 0.0) + record["seconds"], 1)
        report.write()
        print(f"gpu_check: {part} done in {record['seconds']} s", file=sys.stderr, flush=True)
    print(markdown(report.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
