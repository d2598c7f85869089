"""The search: the study driver (``study run``) on Ray Tune and Optuna.

Importing this package keeps Ray's failure-signal handler out of the process before any of its
modules imports Ray (``study.compat``, entry ``ray-signal-handler``): SIGTERM then stops a study
cleanly, as Ctrl-C does.
"""

from study import compat

compat.disable_ray_failure_signal_handler()
