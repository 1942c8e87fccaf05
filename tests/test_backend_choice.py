"""Which training engine an age-up uses, with CUDA and Unsloth made to look present (no GPU needed)."""

from __future__ import annotations

import importlib.machinery
import importlib.util

import pytest
import torch

from evolution.errors import EvolutionError
from evolution.train.backend import resolve_precision, select_backend


@pytest.fixture
def gpu_host(monkeypatch):
    """A host with a CUDA device that runs bf16 and the ``unsloth`` package installed, as far as the choice sees."""
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "unsloth" else real(name, *a))


def test_auto_picks_unsloth_where_cuda_and_unsloth_are_present(gpu_host):
    assert select_backend("auto") == "unsloth"
    assert select_backend("unsloth") == "unsloth"
    assert select_backend("hf") == "hf"  # asked for by name: kept
    assert resolve_precision("auto") == "bf16"


def test_data_parallel_training_runs_on_hf_even_on_a_gpu_host(gpu_host):
    assert select_backend("auto", processes=2) == "hf"
    with pytest.raises(EvolutionError, match="trains in one process, not 2"):
        select_backend("unsloth", processes=2)


def test_cuda_without_unsloth_is_hf_and_asking_for_unsloth_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    assert select_backend("auto") == "hf"
    with pytest.raises(EvolutionError, match=r"pip install 'evolution\[gpu\]'"):
        select_backend("unsloth")


def test_unsloth_without_cuda_is_refused_with_what_to_use_instead(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "unsloth" else real(name, *a))
    assert select_backend("auto") == "hf"
    with pytest.raises(EvolutionError, match="needs a CUDA device"):
        select_backend("unsloth")
