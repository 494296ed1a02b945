"""benchmarks/gpu_check.py, CPU path (tiny sizes): every method runs, step-checkpoint resume is exact, bench runs,
and the section lands between its markers (replaced, not duplicated, on a second run)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_path_writes_the_section(tmp_path, gpu_check, monkeypatch):
    page = tmp_path / "PERFORMANCE.md"
    page.write_text("# Performance\n\nearlier text\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--device", "cpu", "--tiny", "--steps", "8", "--out", str(page), "--work", str(tmp_path / "work")]
    assert gpu_check.main(args) == 0
    text = page.read_text()
    assert text.startswith("# Performance\n\nearlier text\n") and text.count(gpu_check.START) == 1
    for name, _ in gpu_check.METHOD_ROWS:
        assert f"| {name} | no | 8 |" in text, name
    assert "logged losses identical to the uninterrupted run: yes" in text and "resumed mid-epoch: yes" in text
    assert "| HF ViTMAE |" in text and "| MAE |" in text
    gpu_check.write_section(page, gpu_check.START + "\nreplaced\n" + gpu_check.END + "\n")
    assert page.read_text().count(gpu_check.START) == 1 and "replaced" in page.read_text()


def test_refuses_without_cuda(gpu_check, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--out", "/nonexistent/PERF.md"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
