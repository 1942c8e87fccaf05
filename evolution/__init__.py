"""evolution: grow a small language model generation by generation, safely.

One module per stage (``curriculum``, ``train``, ``export``, ``ledger`` …) and a thin
orchestrator (``ageup``) that calls them in order.
"""

__version__ = "0.1.0"
