"""bench/gpu_bench.py runs (at its tiny size on a CPU-only host), so it cannot rot: the transformers + PEFT
backend trains and is measured, and Unsloth is reported with why it could not run here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_gpu_bench_measures_each_backend_or_says_why_not(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import gpu_bench

    report = gpu_bench.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "r.json")])
    hf, unsloth = report["backends"]
    assert hf["available"] and hf["tokens_per_s"] > 0 and hf["tokens"] > 0 and hf["peak_memory_gb"] > 0
    assert 0 < hf["share_of_peak"] < 1
    assert {n for n, _, mb in hf["packages"] if mb} >= {"torch", "transformers", "peft", "trl"}
    assert hf["installed_mb"] > 100  # torch alone is larger
    if not (torch.cuda.is_available() and importlib.util.find_spec("unsloth")):
        assert not unsloth["available"] and "CUDA" in unsloth["reason"]
    out = capsys.readouterr().out
    assert "unavailable" in out or "unsloth / hf" in out
    assert (tmp_path / "r.json").is_file()
