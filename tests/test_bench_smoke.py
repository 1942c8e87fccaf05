"""Every ``bench/`` script runs, at its smallest size, so that none can rot unnoticed (issue 31): a change that
breaks one fails CI, as ``serve_bench.py`` once broke when capture landed and nothing ran it. Where a bench trains,
it starts from the tests' tiny model and curriculum (its ``--base``, curriculum and ``--toml`` options); where it
serves, from the embedded GGUF. No figure is asserted here: a smoke run is not timed, and its numbers are the bench's
to report. What is asserted is that each bench finished and wrote its figures (into a temporary directory:
``EVOLUTION_BENCH_REPORTS``, never ``docs/bench``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import make_daemon_cfg, make_tiny_cfg, make_tiny_curriculum, toml_of

pytestmark = pytest.mark.slow  # each runs a bench in its own process: real llama.cpp, real training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, taught_base):
    """The tiny model, a tiny curriculum, and an ``evolution.toml`` whose children of that model pass their gate."""
    where = tmp_path_factory.mktemp("bench-smoke")
    cur = make_tiny_curriculum(where / "curriculum")
    d = make_daemon_cfg(make_tiny_cfg(cur)).to_dict()
    d.pop("quick")
    toml = where / "evolution.toml"
    toml.write_text(toml_of(d))
    return SimpleNamespace(base=taught_base, curriculum=cur, toml=toml)


def _tiny_args(tiny, curriculum_flag: str = "--curriculum") -> list[str]:
    return ["--base", str(tiny.base), curriculum_flag, str(tiny.curriculum), "--toml", str(tiny.toml)]


def bench(name: str, *args: str, tmp_path: Path, timeout: int = 900) -> str:
    """Run ``bench/<name>_bench.py`` with ``args``; its output (it must exit 0)."""
    env = os.environ | {"EVOLUTION_BENCH_REPORTS": str(tmp_path / "reports"), "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}_bench.py"), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{name}_bench.py {' '.join(args)} failed ({p.returncode}):\n" \
                              f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def _report(tmp_path: Path, name: str) -> dict:
    found = sorted((tmp_path / "reports").glob(f"*-{name}.json"))
    assert found, f"no {name} report in {tmp_path / 'reports'}"
    assert found[-1].with_suffix(".md").is_file()
    return json.loads(found[-1].read_text())["results"]


def test_train_bench(tmp_path, taught_base):
    out = tmp_path / "train.json"
    bench("train", "--steps", "1", "--warmup", "0", "--base", str(taught_base), "--json", str(out), tmp_path=tmp_path)
    stages = json.loads(out.read_text())["stages"]
    assert set(stages) == {"cpt", "sft", "kto", "dpo"}
    assert all({"ours", "trl"} <= set(row) for row in stages.values())  # each stage against stock TRL


def test_ledger_bench(tmp_path):
    printed = bench("ledger", "-n", "40", tmp_path=tmp_path)
    assert "sqlite" in printed and "goal" in printed


def test_memory_bench(tmp_path):
    printed = bench("memory", "--swaps", "1", "--chats", "1", tmp_path=tmp_path)
    assert "rss_growth_mb" in printed


def test_serve_bench(tmp_path):
    printed = bench("serve", "--swaps", "1", "--clients", "1", "--runs", "1", "--seconds", "2", "--skip-training",
                    "--chat-threads", "1", "--all-core-swaps", "1", tmp_path=tmp_path)
    assert "swap" in printed.lower()
    swaps = _report(tmp_path, "serve")["swaps"]
    assert [r["threads"] for r in swaps] == [1] and swaps[0]["swaps"]["failed"] == 0


def test_adapter_bench(tmp_path):
    bench("adapter", "--requests", "1", "--repeats", "1", "--max-tokens", "2", "--rank", "2", tmp_path=tmp_path)
    r = _report(tmp_path, "adapters")
    assert set(r["latency_s"]) == {"never switched", "switching every request"} and r["adapter_bytes"] > 0


def test_task_bench(tmp_path, tiny):
    bench("task", "--rows", "4", "--max-steps", "2", "--rehearse", "1", "0", *_tiny_args(tiny), tmp_path=tmp_path)
    r = _report(tmp_path, "tasks")
    assert [x["rehearse"] for x in r["runs"]] == [1.0, 0.0] and [x["training"]["steps"] for x in r["runs"]] == [2, 2]
    assert all(x["verdict"] in ("pass", "fail") and set(x["with"]) == set(r["without"]) for x in r["runs"])


def test_serve_bench_chat_while_training(tmp_path):
    bench("serve", "--runs", "1", "--seconds", "2", "--skip-swaps", tmp_path=tmp_path)
    rows = _report(tmp_path, "serve")["chat_during_training"]
    assert rows[0]["case"] == "idle" and rows[0]["chats"] > 0 and rows[1]["chats"] == 0 and len(rows) == 5


def test_restate_bench(tmp_path):
    printed = bench("restate", "--facts", "1", "--samples", "1", "--no-report", tmp_path=tmp_path)
    assert printed.strip()


@pytest.fixture
def two_generations(lineage, tiny, tmp_path):
    """A copy of the tests' lineage (generations 0 and 1 of the tiny model) with its settings as ``evolution.toml``."""
    src, cfg = lineage
    home = tmp_path / "two-generations"
    shutil.copytree(src.root, home)
    d = cfg.to_dict()
    d.pop("quick")
    (home / "evolution.toml").write_text(toml_of(d))
    return home


def test_answers_bench(tmp_path, two_generations):
    out = tmp_path / "answers.json"
    bench("answers", "--home", str(two_generations), "--json", str(out), tmp_path=tmp_path)
    assert json.loads(out.read_text())["equal"] is True  # the bench's own check: remembered answers change nothing


def test_retention_bench(tmp_path, two_generations):
    out = tmp_path / "retention.json"
    bench("retention", "--home", str(two_generations), "--json", str(out), tmp_path=tmp_path)
    assert "rebuild_s" in json.loads(out.read_text())


def test_ageup_bench(tmp_path, tiny):
    printed = bench("ageup", "--skip-default", "--ratings", "4", *_tiny_args(tiny), tmp_path=tmp_path)
    assert "quick age-up" in printed


def test_learn_bench(tmp_path, tiny):
    out = tmp_path / "learn.json"
    bench("learn", "--facts", "3", "--rounds", "1", "--bad", "1", "--good", "1", "--json", str(out),
          *_tiny_args(tiny, "--curriculum-dir"), tmp_path=tmp_path)
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1] and rounds[0]["verdict"] in ("pass", "fail")
    assert _report(tmp_path, "learn")["run"]["rounds"] == rounds


def test_learn_bench_tokenizer(tmp_path, tiny):
    bench("learn", "--facts", "3", "--rounds", "1", "--bad", "1", "--good", "1", "--tokenizer", "2",
          *_tiny_args(tiny, "--curriculum-dir"), tmp_path=tmp_path)
    base, own = _report(tmp_path, "learn-tokenizer")["runs"]
    assert "tokenizer" not in base and own["tokenizer"]["added"] == 2
    words = own["rounds"][0]["tokens_per_word"]
    assert words["curriculum"]["after"] < words["curriculum"]["before"] and words["chats"]["words"] > 0


def test_horizon_bench(tmp_path, tiny):
    out = tmp_path / "horizon.json"
    bench("horizon", "--generations", "1", "--facts", "1", "--bad", "1", "--good", "1", "--chats", "2",
          "--json", str(out), *_tiny_args(tiny), tmp_path=tmp_path)
    assert len(json.loads(out.read_text())["rows"]) == 1


def test_retrieval_bench(tmp_path, tiny):
    bench("retrieval", "--facts", "3", "--items", "50", *_tiny_args(tiny), tmp_path=tmp_path)
    figures = _report(tmp_path, "retrieval")
    assert figures["facts"] == 3 and figures["lookup"]["items"] == 50


def test_retrieval_bench_backends(tmp_path):
    pytest.importorskip("chromadb")
    bench("retrieval", "--backends", "fts5", "chroma", "--facts", "3", "--items", "20", "--chroma-items", "5",
          tmp_path=tmp_path)
    figures = _report(tmp_path, "retrieval-backends")["backends"]
    assert figures["fts5"]["items"] == 23 and figures["chroma"]["items"] == 8
    assert figures["fts5"]["first"]["as taught"] is not None


def test_gate_bench(tmp_path, tiny):
    printed = bench("gate", "--probes", "12", "--gates", "2", "--experiences", "6", "--curriculum", str(tiny.curriculum),
                    "--toml", str(tiny.toml), tmp_path=tmp_path)
    figures = _report(tmp_path, "gate")
    assert figures["sample"]["asked"] <= 12 and "probe_recall" in printed
    assert figures["as_run_s"] > 0 and "as the gate runs" in printed
