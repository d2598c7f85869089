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

# The public doors for plug-ins (docs/plugins.md); torch-free, so `import study` stays light.
from study.config.methods import MethodInputs  # noqa: E402
from study.config.registry import register_backbone, register_dataset, register_loss, register_method  # noqa: E402

__all__ = ["MethodInputs", "register_backbone", "register_dataset", "register_loss", "register_method"]
