#!/usr/bin/env python
"""Start the evolution daemon: `python run_daemon.py --start-gen 0 [--host H] [--port P] [--threshold K] [--quick]`.

It serves the current generation over an OpenAI-compatible HTTP API, takes karma and
conversations from the chat agent, and ages the model up in the background whenever karma
crosses the threshold. `python run_daemon.py --help` lists every option; the README explains them.
"""

from evolution.cli.daemon import daemon

if __name__ == "__main__":
    daemon(prog_name="run_daemon.py")
