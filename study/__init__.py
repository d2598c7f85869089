"""study: hyperparameter-search studies for long-tailed recognition by weight balancing.

Stages (``study.stages``, ``study.posthoc``), data (``study.data``), models (``study.models``),
evaluation (``study.evaluation``), the search (``study.driver`` with ``study.tune_adapter``,
``study.resume`` and ``study.ray_runtime``), the on-disk format (``study.layout``), the records and
analysis (``study.records``, ``study.analysis``, ``study.plots``); ``study.cli`` is the command line.
"""

__version__ = "0.1.0"
