"""study: hyperparameter-search studies for long-tailed recognition by weight balancing.

Stages (``study.training.stages``, ``study.training.posthoc``), data (``study.data.lt``), models (``study.training.models``),
evaluation (``study.training.evaluation``), the search (``study.search.driver`` with ``study.search.tune_adapter``,
``study.search.resume`` and ``study.search.ray_runtime``), the on-disk format (``study.layout``), the records and
analysis (``study.results.records``, ``study.results.analysis``, ``study.results.plots``); ``study.cli`` is the command line.
"""

__version__ = "0.1.0"
