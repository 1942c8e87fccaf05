"""The fault-injection hook itself (``evolution.faults``): silent unless asked, exact when asked."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys

import pytest

from evolution import faults


@pytest.fixture(autouse=True)
def _fresh_plan(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
    yield
    faults.reset()


def test_parse_reads_points_actions_and_counts():
    assert faults.parse("") == {}
    assert faults.parse("ledger_append=kill@3, gguf_export=enospc") == {
        "ledger_append": ("kill", 3), "gguf_export": ("enospc", 1)}


@pytest.mark.parametrize("spec", ["ledger_apend=kill", "swap=explode", "swap=kill@0", "swap=kill@x", "swap"])
def test_a_malformed_plan_is_an_error_not_a_silent_no_op(spec, monkeypatch):
    with pytest.raises(ValueError, match="POINT=ACTION"):
        faults.parse(spec)
    monkeypatch.setenv(faults.ENV, spec)
    faults.reset()
    with pytest.raises(ValueError):
        faults.point("swap")


def test_unset_points_do_nothing(monkeypatch):
    for name in faults.POINTS:
        faults.point(name)
    monkeypatch.setenv(faults.ENV, "swap=enospc")
    faults.reset()
    faults.point("ledger_append")  # not named: nothing


def test_enospc_fires_from_the_nth_hit_on(monkeypatch):
    monkeypatch.setenv(faults.ENV, "gguf_export=enospc@3")
    faults.reset()
    faults.point("gguf_export")
    faults.point("gguf_export")
    for _ in range(2):  # a full disk stays full
        with pytest.raises(OSError) as err:
            faults.point("gguf_export")
        assert err.value.errno == errno.ENOSPC and "gguf_export" in str(err.value)


def test_kill_is_a_sigkill_at_exactly_the_nth_hit(tmp_path):
    script = ("from evolution import faults\n"
              "for i in range(1, 10):\n"
              "    print(i, flush=True)\n"
              "    faults.point('train_step')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
                          env={"EVOLUTION_FAULTS": "train_step=kill@4", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["1", "2", "3", "4"]  # died inside the 4th hit, before the 5th line
