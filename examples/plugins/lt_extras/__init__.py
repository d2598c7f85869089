"""A plug-in package (``plugins: [lt_extras]`` with its folder on PYTHONPATH, or installed): a small
backbone, a stage-2 method and a dataset, each registered through the public ``study.register_*``."""

from lt_extras import backbones, datasets, methods  # noqa: F401  (importing registers them)
