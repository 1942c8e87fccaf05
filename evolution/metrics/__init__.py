"""The gate's metrics, one unit per module, and ``TABLE``: the units the gate measures, in order.

Each unit (``common.Metric``) names itself, says how it is measured on a GGUF through llama.cpp,
which rules it must meet and the dataclass of the ``[gate]`` settings they read (``config``, beside
it); ``evolution.gate`` measures, decides and reports by iterating ``TABLE``, ``evolve ledger show``
orders its rows by it, and ``evolution.config.GateConfig`` holds every unit's settings. Adding a
metric is adding a module and a line here. The order is the order of measurement: the chat metrics share
one llama.cpp context (its prompt cache carries from one to the next), so keep it stable.
"""

from evolution.metrics.common import Check, EvalSet, GateSettings, Inputs, Measured, Metric, Models
from evolution.metrics.generalization import Generalization
from evolution.metrics.experience_similarity import ExperienceSimilarity
from evolution.metrics.perplexity import Perplexity
from evolution.metrics.persona_leak import PersonaLeak
from evolution.metrics.preference_margin import PreferenceMargin
from evolution.metrics.probe_recall import ProbeRecall
from evolution.metrics.recall import Recall
from evolution.metrics.smoke import Smoke
from evolution.metrics.style_drift import StyleDrift

TABLE: tuple[Metric, ...] = (Smoke(), Recall(), Generalization(), StyleDrift(), ProbeRecall(), PersonaLeak(),
                              ExperienceSimilarity(), PreferenceMargin(), Perplexity())

__all__ = ["TABLE", "Check", "EvalSet", "GateSettings", "Inputs", "Measured", "Metric", "Models"]
