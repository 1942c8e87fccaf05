"""Bad input the other suites leave out: path traversal in every name or number the HTTP API and the
CLI take, unknown generations, enormous and undecodable curriculum files.

Each gets a clear 4xx or a non-zero exit with a message, never a traceback; and nothing changes:
the served generation, the ledger and the karma stay as they were, and no generation is built.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolution import curriculum
from evolution.cli import main
from evolution.errors import CurriculumError
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from tests.conftest import SERVER_TOKEN

AUTH = {"Authorization": f"Bearer {SERVER_TOKEN}"}
ASK = [{"role": "user", "content": "What is your name?"}]
TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "evolution-gen-0001/../../../etc/passwd",
              "evolution-gen-../0000", "..\\..\\windows\\win.ini", "%2e%2e/%2e%2e/etc/passwd", "checkpoints/gen_0000",
              "file:///etc/passwd", "evolution-gen-0001\x00.gguf", "~root/.ssh/id_rsa"]


def _unchanged(daemon, entries: int) -> None:
    assert daemon.host.current.gen == 1 and daemon.ledger.served_generation() == 1
    assert len(daemon.ledger.entries()) == entries  # nothing recorded


@pytest.mark.parametrize("name", TRAVERSALS)
def test_a_path_as_the_model_name_never_reaches_a_file(client, daemon, name, tally):
    tally.bad_input("bad input · path traversal (HTTP)", 3)
    entries = len(daemon.ledger.entries())
    r = client.post("/v1/chat/completions", json={"model": name, "messages": ASK, "max_tokens": 4})
    if name.startswith("evolution-gen-"):  # names another generation: refused, not resolved
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    else:  # any other name is just a label for the served model
        assert r.status_code == 200 and r.json()["model"] == "evolution-gen-0001", r.text
    r = client.get("/v1/models/" + quote(name, safe=""))
    assert r.status_code == 404 and "root:" not in r.text
    r = client.get("/" + quote(name, safe="/%:~\\"))
    assert r.status_code == 404 and "root:" not in r.text and r.json()["error"]
    _unchanged(daemon, entries)


@pytest.mark.parametrize("to,status", [
    ("1/../0", 400), ("../../etc/passwd", 400), ("0/", 400), ("checkpoints/gen_0000", 400), ([0], 400),
    ({"gen": 0}, 400), ("0", 400), (0.5, 400), (-1, 400), (2**31, 400), (10**30, 400), (float("nan"), 400),
    (99, 404), (2**31 - 1, 404),
])
def test_rollback_takes_a_generation_number_and_nothing_else(client, daemon, to, status, tally):
    tally.bad_input("bad input · generation numbers (HTTP)")
    entries = len(daemon.ledger.entries())
    body = json.dumps({"to": to}, allow_nan=True)
    r = client.post("/rollback", content=body, headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == "to"
    _unchanged(daemon, entries)


def test_unknown_generations_are_404_everywhere(client, daemon, tally):
    entries = len(daemon.ledger.entries())
    for gen in (2, 99, 9999):
        tally.bad_input("bad input · generation numbers (HTTP)", 3)
        mid = f"evolution-gen-{gen:04d}"
        assert client.post("/v1/chat/completions", json={"model": mid, "messages": ASK}).status_code == 404
        assert client.get(f"/v1/models/{mid}").status_code == 404
        r = client.post("/rollback", json={"to": gen}, headers=AUTH)
        assert r.status_code == 404 and f"generation {gen}" in r.json()["error"]["message"], r.text
    _unchanged(daemon, entries)


path_like = st.lists(st.sampled_from(["..", "/", "\\", "%2e", "%2f", "%00", "etc", "passwd", "evolution-gen-",
                                      "0001", "gen_0000", "~", ".", ":", "\x00", "model.gguf"]), max_size=8).map("".join)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.one_of(path_like, st.text(max_size=40)))
def test_any_model_name_is_served_by_the_served_model_or_refused(client, daemon, name, tally):
    tally.bad_input("bad input · path traversal (HTTP)", 2)
    r = client.post("/v1/chat/completions", json={"model": name, "messages": ASK, "max_tokens": 2})
    assert r.status_code in (200, 404), r.text
    if r.status_code == 200:
        assert r.json()["model"] == "evolution-gen-0001"
    r = client.get("/v1/models/" + quote(name, safe=""))  # "", "." and ".." normalize to the list itself
    assert r.status_code in (200, 404), r.text
    if r.status_code == 200:
        assert r.json().get("id", "evolution-gen-0001") == "evolution-gen-0001" and "evolution-gen-0000" not in r.text
    assert daemon.host.current.gen == 1


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def evolve(_isolated_home):
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return run


@pytest.mark.parametrize("args,code,fragment", [
    (("ledger", "show", "1/../2"), 2, "'1/../2' is not a generation"),
    (("ledger", "show", "-1"), 2, "-1"),
    (("ledger", "show", "99"), 1, "generation 99 is not in the ledger"),
    (("ledger", "show", "99999999999999999999999"), 1, "is not in the ledger"),
    (("rollback", "--to", "../0"), 2, "not a valid integer"),
    (("rollback", "--to", "99"), 1, "generation 99 is not in the ledger"),
    (("rollback", "--to", "99999999999999999999999"), 1, "is not in the ledger"),
    (("karma", "add", "../5"), 2, "not a valid float"),
    (("age-up", "--base", "/etc"), 1, "not a Hugging Face checkpoint directory"),
    (("age-up", "--base", "../../../../../../../../etc"), 1, "not a Hugging Face checkpoint directory"),
    (("age-up", "--curriculum", "../../../../../../../../etc"), 1, "no phaseN_<name>/ folders found"),
    (("age-up", "--phases", "1/../2"), 2, "expected comma-separated numbers"),
    (("curriculum", "check", "/etc"), 1, "no phaseN_<name>/ folders found"),
])
def test_the_cli_refuses_paths_where_numbers_go_and_unknown_generations(evolve, _isolated_home, args, code,
                                                                       fragment, tally):
    tally.bad_input("bad input · path traversal and unknown generations (CLI)")
    out = evolve(*args)
    assert out.exit_code == code, out.output
    assert fragment in out.output and "Traceback" not in out.output, out.output
    root = DataRoot(_isolated_home)
    assert root.generations() == [] and root.partial_generations() == []
    with Ledger.open(root) as led:
        assert led.entries() == []


def test_a_config_that_names_a_path_as_a_phase_is_refused(evolve, _isolated_home, tmp_path, tally):
    tally.bad_input("bad input · path traversal and unknown generations (CLI)")
    conf = tmp_path / "evil.toml"
    conf.write_text('[curriculum]\nphases = ["../../etc"]\n')
    out = evolve("age-up", "--config", str(conf))
    assert out.exit_code == 1 and "curriculum.phases must be a list of phase numbers" in out.output, out.output
    assert DataRoot(_isolated_home).generations() == []


# -- curriculum files ----------------------------------------------------------------------------


def _problems(cur_root) -> list[str]:
    with pytest.raises(CurriculumError) as err:
        curriculum.load(cur_root)
    return err.value.problems


@pytest.mark.parametrize("content,fragment", [
    (b'{"text": "' + b"a" * (2 << 20) + b'"}\n', "sft.jsonl:1: line is 2097164 bytes, over the 1048576 byte limit"),
    (b"\n".join([b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}'] * 3
                + [b"x" * ((1 << 20) + 1)]), "sft.jsonl:4: line is 1048577 bytes"),
    ('{"messages": []}\n'.encode("utf-16"), "sft.jsonl:1: not UTF-8"),
    (b"\xff\xfe\xfd\n", "sft.jsonl:1: not UTF-8"),
    (b"\x00\x00\x00\n", "sft.jsonl:1: invalid JSON"),
    (b" \n\t\n\n", "sft.jsonl: file is empty"),
    ("\ufeff".encode() + b'{"messages": []}\n', "sft.jsonl:1: invalid JSON"),
])
def test_enormous_undecodable_and_blank_curriculum_files_are_named_by_file_and_line(tiny_curriculum, content,
                                                                                   fragment, tally):
    tally.bad_input("bad input · curriculum files")
    (tiny_curriculum / "phase1_identity" / "sft.jsonl").write_bytes(content)
    problems = _problems(tiny_curriculum)
    assert any(p.startswith("phase1_identity/") and fragment in p for p in problems), problems


def test_a_curriculum_file_that_is_a_folder_or_a_symlink_loop_is_a_problem_not_a_crash(tiny_curriculum, tally):
    tally.bad_input("bad input · curriculum files", 2)
    sft = tiny_curriculum / "phase1_identity" / "sft.jsonl"
    sft.unlink()
    sft.mkdir()
    loop = tiny_curriculum / "phase0_language" / "cpt.jsonl"
    loop.unlink()
    loop.symlink_to(loop)
    problems = _problems(tiny_curriculum)
    assert any(p.startswith("phase1_identity/sft.jsonl: cannot read") for p in problems), problems
    assert any(p.startswith("phase0_language/cpt.jsonl: cannot read") for p in problems), problems
