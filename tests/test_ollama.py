"""``evolve export ollama``: the Modelfile renders a conversation into the prompt llama.cpp serves, the GGUF beside it
is the gated one, and bad input changes nothing.

Ollama is not installed here; its TEMPLATE is a Go text/template, rendered in these tests by ``render_go`` — the
subset the Modelfile uses (``range``, fields, ``end``, whitespace trimming), raising on anything else so that a
template that grows beyond it fails here rather than passing untested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import pytest
from click.testing import CliRunner

from evolution import ollama
from evolution.base import embedded_gguf
from evolution.cli import main as cli
from evolution.errors import EvolutionError
from evolution.fsutil import sha256_file
from evolution.ledger import Ledger
from evolution.ledger.rollback import check_servable
from evolution.paths import DataRoot

CONVERSATIONS = [
    [{"role": "user", "content": "Where do I keep my keys?"}],
    [{"role": "system", "content": "You are Wren."}, {"role": "user", "content": "Who made you?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Two lines:\nfirst, then second."}],
]


def render_go(template: str, messages: list[dict], system: str | None) -> str:
    """``template`` as Ollama renders it for ``messages`` (``system``, the Modelfile's SYSTEM, first where they have
    no system turn): Go text/template's ``{{ range .Messages }}``, ``{{ .Role }}``, ``{{ .Content }}``, ``{{ end }}``
    and the ``{{-`` / ``-}}`` trim markers."""
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    for i, p in enumerate(parts):  # trim markers eat the whitespace beside them
        if p.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if p.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()

    def run(i: int, scope: dict | None, out: list[str]) -> int:
        while i < len(parts):
            p = parts[i]
            if not p.startswith("{{"):
                out.append(p)
                i += 1
                continue
            action = p.strip("{}").strip("-").strip()
            if action == "end":
                return i + 1
            if action == "range .Messages":
                end = i + 1
                for m in messages:
                    end = run(i + 1, m, out)
                if not messages:  # skip the body
                    end = run(i + 1, {"role": "", "content": ""}, [])
                i = end
            elif action in (".Role", ".Content") and scope is not None:
                out.append(scope[action[1:].lower()])
                i += 1
            else:
                raise NotImplementedError(f"render_go does not know {{{{ {action} }}}}")
        return i

    out: list[str] = []
    run(0, None, out)
    return "".join(out)


def _serve_prompt(gguf, messages):
    """The prompt the daemon's llama.cpp renders for ``messages``."""
    from evolution.llamacpp import open_llama, serve_prompt, template_formatter

    llm = open_llama(gguf, n_ctx=512, n_threads=1, seed=0)
    return serve_prompt(template_formatter(llm), messages)


def test_the_modelfile_renders_what_llama_cpp_serves_for_the_embedded_model():
    gguf = embedded_gguf()
    fmt, system = ollama.recognize(*ollama.gguf_chat_template(gguf))
    assert fmt.name == "ChatML" and system and "SmolLM" in system  # its template's own default system turn
    for conversation in CONVERSATIONS:
        assert render_go(fmt.template, conversation, system) == _serve_prompt(gguf, conversation)
    text = ollama.modelfile("model.gguf", fmt, system)
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop """<|im_end|>"""' in text
    assert f'SYSTEM """{system}"""' in text


def test_a_chat_template_of_another_format_is_refused_by_name():
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ollama.ExportError, match="none of the formats .*ChatML.*LM Studio"):
        ollama.recognize(llama3, "<|begin_of_text|>", "<|eot_id|>")
    with pytest.raises(ollama.ExportError, match="no chat template"):
        ollama.recognize(None, "", "")


@pytest.fixture
def root(lineage, tmp_path):
    src, _ = lineage
    home = tmp_path / "lineage-copy"
    shutil.copytree(src.root, home)
    return DataRoot(home)


def _fake_ollama(bin_dir, code: int = 0):
    """An ``ollama`` on the PATH that records its arguments (the real one is not installed here)."""
    bin_dir.mkdir()
    script = bin_dir / "ollama"
    script.write_text(f'#!/bin/sh\necho "$@" > "{bin_dir}/args"\necho "boom" >&2\nexit {code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_export_writes_the_gated_gguf_and_a_modelfile_and_refuses_to_overwrite(root, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_ollama(tmp_path / "bin")) + os.pathsep + os.environ["PATH"])
    with Ledger.open(root) as led:
        served = led.served_generation()
        sha = check_servable(led, served)["sha256"]
        done = ollama.export(root, led)
        assert done.gen == served and done.created and done.name == f"evolution-main:gen-{served}"
        assert sha256_file(done.gguf) == sha == done.sha256
        assert done.modelfile.read_text().startswith(f"FROM ./{done.gguf.name}\n")
        assert (tmp_path / "bin" / "args").read_text().split() == ["create", done.name, "-f", str(done.modelfile)]
        before = done.modelfile.read_text()
        with pytest.raises(ollama.ExportError, match="already exist.*--force"):
            ollama.export(root, led, served)
        assert done.modelfile.read_text() == before
        again = ollama.export(root, led, served, force=True, create=False)
        assert not again.created and sha256_file(again.gguf) == sha
        assert led.served_generation() == served and led.verify().ok  # nothing served or recorded changed


def test_a_failing_ollama_create_says_so_and_where_the_modelfile_is(root, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_ollama(tmp_path / "bin", code=3)) + os.pathsep + os.environ["PATH"])
    with Ledger.open(root) as led, pytest.raises(ollama.ExportError, match=r"ollama create .* failed \(3\): boom"):
        ollama.export(root, led, 0, tmp_path / "out")
    assert (tmp_path / "out" / "Modelfile").is_file()


def test_bad_input_exports_nothing(root, tmp_path):
    with Ledger.open(root) as led:
        with pytest.raises(EvolutionError, match="generation 7"):
            ollama.export(root, led, 7, tmp_path / "unknown", create=False)
        with pytest.raises(ollama.ExportError, match="not an Ollama model name"):
            ollama.export(root, led, 0, tmp_path / "badname", name="Evolution Main", create=False)
        gguf = root.root / check_servable(led, 1)["path"]
        gguf.write_bytes(gguf.read_bytes()[:-1] + b"\x00")  # tampered after it was gated
        with pytest.raises(EvolutionError, match="sha256"):
            ollama.export(root, led, 1, tmp_path / "tampered", create=False)
    assert not any((tmp_path / d).exists() for d in ("unknown", "badname", "tampered"))


def test_the_cli_exports_and_prints_json(root, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOLUTION_HOME", str(root.root))
    r = CliRunner().invoke(cli, ["export", "ollama", "0", "--out", str(tmp_path / "o"), "--no-create", "--json"])
    assert r.exit_code == 0, r.output
    done = json.loads(r.output)
    assert done["gen"] == 0 and done["format"] == "ChatML" and not done["created"]
    assert (tmp_path / "o" / "Modelfile").is_file()
    r = CliRunner().invoke(cli, ["export", "ollama", "0", "--out", str(tmp_path / "o"), "--no-create"])
    assert r.exit_code != 0 and "--force" in r.output
