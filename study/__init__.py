"""study: hyperparameter-search studies for long-tailed recognition by weight balancing.

The package follows the data flow; each subpackage imports only what lies upstream of it
(``tests/test_structure.py`` holds the rules):

- ``study.config``: the configuration dataclasses, search-space files, the dataset catalog,
  stage-2 methods and backbone names (torch-free);
- ``study.data``: the datasets' files, the long-tailed build, device batches, samplers, streaming;
- ``study.training``: models, losses, the two stages' trainers, post-hoc methods, a trial
  (every seed of one configuration) and ``study train``;
- ``study.search``: the study driver (``study run``) on Ray Tune and Optuna;
- ``study.results``: records, tables, statistics and plots of a study folder (no torch, no Ray).

At the root: the on-disk format (``study.layout``), user errors, file utilities, provenance, the
fault-injection hooks of the tests, and ``study.cli``, the command line.
"""

__version__ = "0.2.0"
