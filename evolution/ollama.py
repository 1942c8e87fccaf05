"""Ollama and LM Studio: a gated generation as a model they load (``evolve export ollama [N]``).

Ollama reads a Modelfile: ``FROM`` (the GGUF), ``TEMPLATE`` (a Go template that renders a conversation into the
prompt), ``PARAMETER stop`` (where a reply ends) and ``SYSTEM`` (the system turn a conversation without one gets).
The daemon renders chats with the GGUF's own Jinja chat template (``evolution.llamacpp``); the Modelfile must render
the same prompt, or the model Ollama serves is not the model that was gated. Jinja cannot be translated to Go in
general, so this module knows the chat formats it can write (``FORMATS``: ChatML today, the embedded SmolLM2's and
Qwen's), recognizes one by rendering probe conversations through the GGUF's template and comparing, and refuses any
other with a clear error. LM Studio loads the GGUF itself (the chat template is inside it): the exported directory
holds it too.

The GGUF is checked against the ledger's SHA-256 (``check_servable``: only a generation that passed its gate, or 0)
and hard-linked beside the Modelfile (copied across file systems). Nothing is overwritten without ``force``; nothing
the daemon serves or the ledger records changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evolution.errors import EvolutionError
from evolution.fsutil import sha256_file
from evolution.ledger import Ledger
from evolution.ledger.rollback import check_servable
from evolution.paths import DataRoot


class ExportError(EvolutionError):
    """A generation cannot be exported for Ollama as asked."""


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str
    """The Modelfile's TEMPLATE (Go text/template, as Ollama renders it: ``.Messages`` with ``.Role`` and
    ``.Content``; Ollama puts ``SYSTEM`` first where a conversation has no system turn)."""
    render: Callable[[list[dict]], str]
    """The same prompt in Python: what the GGUF's Jinja template must render for this format to be the one."""
    stop: tuple[str, ...]
    default_system: Callable[[str], str | None]
    """The system text the GGUF's template puts before a conversation that has none (from one rendered without)."""


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _chatml_system(rendered: str) -> str | None:
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", rendered, re.DOTALL)
    return m.group(1) if m else None


FORMATS = (
    ChatFormat(
        name="ChatML",
        template=('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                  '{{ end }}<|im_start|>assistant\n'),
        render=_chatml, stop=("<|im_start|>", "<|im_end|>"), default_system=_chatml_system),
)

PROBES = (
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "You are a careful helper."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."},
     {"role": "user", "content": "And another,\nplease?"}],
)
"""Conversations rendered through the GGUF's template and each format's: with and without a system turn, with
an earlier reply and a line break."""


def gguf_chat_template(path: Path) -> tuple[str | None, str, str]:
    """The GGUF's chat template (None: it has none) and its BOS and EOS token text, read from its metadata."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a GGUF file llama.cpp wrote ({exc})") from exc

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.parts[f.data[0]]

    def text(key: str) -> str | None:
        v = field(key)
        return None if v is None else bytes(v).decode("utf-8", "replace")

    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(key: str) -> str:
        i = field(key)
        if i is None or tokens is None:
            return ""
        return bytes(tokens.parts[tokens.data[int(i[0])]]).decode("utf-8", "replace")

    return text("tokenizer.chat_template"), token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")


def _jinja(template: str, bos: str, eos: str) -> Callable[[list[dict]], str]:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    return lambda messages: formatter(messages=messages).prompt


def recognize(template: str | None, bos: str, eos: str) -> tuple[ChatFormat, str | None]:
    """The format of ``FORMATS`` the chat template renders every probe as, and its default system text."""
    if not template:
        raise ExportError("the GGUF has no chat template (tokenizer.chat_template); Ollama would not know how to "
                          "render a conversation. Export a generation of a chat model.")
    render = _jinja(template, bos, eos)
    for fmt in FORMATS:
        system = fmt.default_system(render(list(PROBES[0])))
        if all(render(list(p)) == fmt.render(_with_system(p, system)) for p in PROBES):
            return fmt, system
    raise ExportError("the GGUF's chat template is none of the formats evolution can write a Modelfile for ("
                      f"{', '.join(f.name for f in FORMATS)}); LM Studio loads the GGUF with its own template: "
                      "use the .gguf file directly")


def _with_system(messages, system: str | None) -> list[dict]:
    """``messages`` as Ollama passes them to TEMPLATE: ``SYSTEM`` first where they have no system turn."""
    messages = list(messages)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (it may span lines); refused where it holds them itself."""
    if '"""' in text:
        raise ExportError(f"cannot write {text[:40]!r}... into a Modelfile: it holds triple quotes")
    return f'"""{text}"""'


def modelfile(gguf_name: str, fmt: ChatFormat, system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(fmt.template)}"]
    lines += [f"PARAMETER stop {_quoted(s)}" for s in fmt.stop]
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Exported:
    gen: int
    directory: Path
    modelfile: Path
    gguf: Path
    sha256: str
    format: str
    name: str
    created: bool
    """Whether ``ollama create`` ran (``ollama`` installed and not ``create=False``)."""

    def to_dict(self) -> dict:
        return {"gen": self.gen, "directory": str(self.directory), "modelfile": str(self.modelfile),
                "gguf": str(self.gguf), "sha256": self.sha256, "format": self.format, "name": self.name,
                "created": self.created}


def model_name(root: DataRoot, gen: int) -> str:
    """``evolution-<lineage>:gen-<N>``: Ollama's model name, tag."""
    return f"evolution-{root.lineage}:gen-{gen}".lower()


def export(root: DataRoot, ledger: Ledger, gen: int | None = None, out: Path | None = None, name: str | None = None,
           force: bool = False, create: bool = True) -> Exported:
    """Write generation ``gen`` (default: the served one) as ``out/Modelfile`` beside its GGUF, and run
    ``ollama create`` where ``ollama`` is on the PATH and ``create``."""
    if gen is None:
        gen = ledger.served_generation()
        if gen is None:
            raise ExportError("no generation is served yet; name one: `evolve export ollama N`")
    record = check_servable(ledger, gen)  # passed its gate (or 0), not pruned, its GGUF as recorded
    src = root.root / record["path"]
    fmt, system = recognize(*gguf_chat_template(src))
    name = name or model_name(root, gen)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*(?::[a-z0-9._-]+)?", name):
        raise ExportError(f"{name!r} is not an Ollama model name (lowercase letters, digits, '.', '_', '-', "
                          "and one ':tag')")
    out = out or root.root / "exports" / "ollama" / f"gen_{gen:04d}"
    target, gguf = out / "Modelfile", out / src.name
    existing = [p for p in (target, gguf) if p.exists()]
    if existing and not force:
        raise ExportError(f"{', '.join(map(str, existing))} already exist(s); pass --force to replace, or --out "
                          "another directory")
    out.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_name(gguf.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # the very file check_servable hashed: nothing to hash again
    except OSError:  # another file system (or one without hard links): a copy, hashed as the ledger recorded
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != record["sha256"]:
            tmp.unlink(missing_ok=True)
            raise ExportError(f"the copy of generation {gen}'s GGUF does not hash as the ledger recorded; "
                              "nothing was exported")
    os.replace(tmp, gguf)
    text = modelfile(gguf.name, fmt, system)
    tmp_mf = target.with_name("Modelfile.tmp")
    tmp_mf.write_text(text, encoding="utf-8")
    os.replace(tmp_mf, target)
    created = False
    ollama = shutil.which("ollama")
    if create and ollama:
        p = subprocess.run([ollama, "create", name, "-f", str(target)], capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise ExportError(f"`ollama create {name}` failed ({p.returncode}): {(p.stderr or p.stdout)[-500:]}; "
                              f"the Modelfile is at {target}")
        created = True
    return Exported(gen, out, target, gguf, record["sha256"], fmt.name, name, created)
