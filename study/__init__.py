"""study: hyperparameter-search studies for long-tailed recognition by weight balancing.

Stages (``study.stages``), data (``study.data``), models (``study.models``), evaluation
(``study.evaluation``), the search (``study.search``) and the analysis (``study.analysis``);
``study.cli`` is the command line.
"""

__version__ = "0.1.0"
