"""Search for the pipeline that meets a budget with the least error: ``optimize(model, x, target=Target(...))``.

``target.py`` (what is asked), ``space.py`` (sites and options → pipelines), ``sensitivity.py`` (each
option's error), ``cost_model.py`` (measured per-node latency, counted size/MACs), ``allocate.py`` (the
knapsack front), ``driver.py`` (proposals verified end to end), ``result.py`` (the Pareto report).
"""

from .driver import search
from .result import Candidate, SearchResult, load_pipeline
from .target import Target, parse_target

__all__ = ["Candidate", "SearchResult", "Target", "load_pipeline", "parse_target", "search"]
