"""scripts/install.sh --gpu checks what a CUDA build needs before it installs anything."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATH = "/usr/bin:/bin"


@pytest.mark.skipif(shutil.which("nvcc", path=PATH) is not None, reason="nvcc is installed: --gpu would install")
def test_install_gpu_without_the_cuda_toolkit_says_what_is_missing_and_installs_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EVOLUTION_LLAMA_CMAKE_ARGS"} | {"PATH": PATH}
    p = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--gpu", str(tmp_path / "venv")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "nvcc (the CUDA toolkit) is not on PATH" in p.stderr and "EVOLUTION_LLAMA_CMAKE_ARGS" in p.stderr
    assert not (tmp_path / "venv").exists()
