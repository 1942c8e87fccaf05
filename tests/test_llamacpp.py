"""``evolution.llamacpp``: loading a GGUF keeps working whatever else in the process did to llama-cpp-python's
quiet-load files."""

from __future__ import annotations

import logging
import os

from evolution.base import embedded_gguf
from evolution.llamacpp import open_llama


def test_a_load_after_another_part_closed_llama_cpps_null_files_loads_and_says_so(caplog):
    """The CI failure this guards: absl's logging handler (imported by rouge-score in one gate thread while the other
    loaded a model) was made on llama-cpp-python's /dev/null file, and uvicorn's logging set-up closed it; every load
    after that, in every later test, failed with "I/O operation on closed file"."""
    from llama_cpp import _utils

    try:
        _utils.errnull_file.close()  # what closing absl's handler did to the stream it was made on
        _utils.outnull_file.close()
        with caplog.at_level(logging.WARNING, logger="evolution.llamacpp"):
            llm = open_llama(embedded_gguf(), n_ctx=256, n_threads=1, seed=0)
        assert llm.tokenize(b"Hello", add_bos=False)
        assert not _utils.errnull_file.closed and not _utils.outnull_file.closed
        assert "errnull_file was closed" in caplog.text and "outnull_file was closed" in caplog.text
        llm.close()
        assert open_llama(embedded_gguf(), n_ctx=256, n_threads=1, seed=0).n_ctx() == 256  # and the next one
    finally:
        for name in ("outnull_file", "errnull_file"):  # never leave the rest of the suite without them
            if getattr(_utils, name).closed:
                setattr(_utils, name, open(os.devnull, "w"))  # noqa: SIM115
