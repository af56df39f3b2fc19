"""parallel.megatron_compat: the CPU shim for Megatron-core's pipeline schedules.

check_assumptions() must pass on the pinned megatron-core and fail loudly when Megatron moves under
it (version, symbol, or the inventory of CUDA sites in the patched source files).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import package_info
from megatron.core.pipeline_parallel import p2p_communication, schedules

from v4train.parallel import megatron_compat
from v4train.parallel.megatron_compat import MegatronAssumptionError, check_assumptions, install


def test_check_assumptions_passes_on_the_pinned_version():
    assert package_info.__version__ == megatron_compat.EXPECTED_MEGATRON_VERSION == "0.16.1"
    check_assumptions()


def test_check_assumptions_rejects_another_version(monkeypatch):
    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(MegatronAssumptionError, match=r"megatron-core 0\.17\.0 is installed"):
        check_assumptions()


def test_check_assumptions_rejects_a_missing_symbol(monkeypatch):
    monkeypatch.delattr(schedules, "forward_backward_pipelining_without_interleaving")
    missing = r"schedules\.forward_backward_pipelining_without_interleaving is missing"
    with pytest.raises(MegatronAssumptionError, match=missing):
        check_assumptions()


def _patched_copy(module, tmp_path, monkeypatch, old: str, new: str) -> None:
    """Point ``module.__file__`` at a copy of its source with ``old`` replaced by ``new``."""
    with open(module.__file__, encoding="utf-8") as source:
        text = source.read()
    assert text.count(old) == 1
    copy = tmp_path / "copy.py"
    copy.write_text(text.replace(old, new), encoding="utf-8")
    monkeypatch.setattr(module, "__file__", str(copy))


def test_check_assumptions_rejects_a_new_cuda_site(tmp_path, monkeypatch):
    _patched_copy(
        schedules, tmp_path, monkeypatch,
        "    forward_data_store = []\n    input_tensor, output_tensor_grad = None, None\n",
        "    forward_data_store = [torch.ones(1, device='cuda')]\n"
        "    input_tensor, output_tensor_grad = None, None\n",
    )
    with pytest.raises(
        MegatronAssumptionError,
        match=r'forward_backward_no_pipelining: expected 0 x torch\.ones\(device="cuda"\), found 1',
    ):
        check_assumptions()


def test_check_assumptions_rejects_a_moved_p2p_buffer(tmp_path, monkeypatch):
    _patched_copy(
        p2p_communication, tmp_path, monkeypatch,
        "                recv_prev_shape,\n                requires_grad=True,\n"
        "                device=torch.cuda.current_device(),\n",
        "                recv_prev_shape,\n                requires_grad=True,\n"
        "                device='cuda',\n",
    )
    with pytest.raises(MegatronAssumptionError) as error:
        check_assumptions()
    message = str(error.value)
    assert "create_tensor_recv_prev: expected 1 x torch.cuda.current_device, found 0" in message
    assert 'create_tensor_recv_prev: expected 0 x torch.empty(device="cuda"), found 1' in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="install() is a no-op on CUDA hosts")
def test_install_is_idempotent_and_scoped_to_the_schedules():
    assert install() is True
    proxy = schedules.torch
    assert install() is True
    assert schedules.torch is proxy and p2p_communication.torch is proxy
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device == torch.device("cpu")
    assert p2p_communication.torch.cuda.current_device() == torch.device("cpu")
    assert p2p_communication.torch.cuda.synchronize() is None
    assert schedules.torch.Tensor is torch.Tensor
    # The process-wide torch.cuda is untouched: CUDA is still absent for everyone else.
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        torch.cuda.current_device()
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        torch.zeros(1, device="cuda")


def test_install_refuses_to_patch_a_cuda_host(monkeypatch):
    monkeypatch.setattr(schedules, "torch", torch)
    monkeypatch.setattr(p2p_communication, "torch", torch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert install() is False
    assert schedules.torch is torch and p2p_communication.torch is torch


def test_a_rank_process_imports_megatron_without_torchdynamo():
    """Importing a rank's code imports Megatron-core with its fused helpers left uncompiled: neither TorchDynamo
    nor TorchInductor gets imported (a third of a rank's start), and torch.compile is the real one afterwards.
    Fails if Megatron-core starts compiling at import another way, or a module imports it before
    ``parallel/schedules.py`` does. The package's other modules import no Megatron-core at all (the torchrun
    launcher's one-line errors come before it)."""
    import subprocess
    import sys

    code = ("import sys, torch; real = torch.compile; import v4train.orchestrator.rank.worker; "
            "import megatron.core.jit as jit; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules), "
            "jit.jit_fuser.__name__, torch.compile is real)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["[]", "_no_compile", "True"], out.stdout + out.stderr[-2000:]
    code = "import sys, v4train.parallel.groups, v4train.parallel.distributed_muon; print('megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False"], out.stdout + out.stderr[-2000:]
