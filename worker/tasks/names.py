"""The tasks' names: stable, because senders publish them by name without importing the tasks.

The scheduler sends ``ichvol.process_run`` (its own copy of the name, in
:mod:`scheduler.enqueue`: it never imports the worker's task code); ``ichvol redeliver
--enqueue`` sends ``ichvol.deliver`` through :mod:`worker.tasks.send`.
"""

from __future__ import annotations

TASK_PROCESS_RUN = "ichvol.process_run"
TASK_DELIVER = "ichvol.deliver"
