"""evolution: grow a small language model generation by generation, safely.

One module per stage (``curriculum``, ``train``, ``export``, ``ledger`` …) and a thin
orchestrator (``ageup``) that calls them in order.
"""

__version__ = "0.1.0"

import os as _os

# torch and llama.cpp share one OpenMP runtime, whose default wait policy spins at every barrier.
# Beside another busy process on the same cores (the daemon's chats while its worker trains, the
# gate's llama.cpp beside a chat agent) spinning threads starve one another: llama.cpp generated
# 0.4 tokens/s with the default and 32.6 with PASSIVE on this 2-core machine beside a training run
# (docs/performance.md, "OpenMP wait policy"). PASSIVE threads sleep instead. It must be set before
# torch or llama_cpp loads the runtime, so here; a value already in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
