"""scripts/gpu_sync_check.py: the check that a training step of MDEQ-Tiny never reads the device from
the host inside the DEQ layer, and that the step can be captured whole. On a CPU the script refuses the
Tensor methods that read a value back; on CUDA it uses torch.cuda.set_sync_debug_mode("error")."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_sync_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_sync_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sync_free_step_passes_and_host_checks_are_caught(tmp_path, capsys):
    script = _script()
    assert script.main(["--device", "cpu", "--tiny", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   no host sync in the DEQ layer") == 4 and "captured" in out
    # the control: solvers that check on the host every step must be caught, for every mode
    assert script.main(["--device", "cpu", "--tiny", "--host-checks"]) == 1
    assert capsys.readouterr().out.count("FAIL no host sync") == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_free_step_on_cuda():
    assert _script().main(["--device", "cuda", "--batch", "8", "--repeats", "3"]) == 0
