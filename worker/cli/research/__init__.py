"""The research commands: make and score models (train, dataset, evaluate, evaluate-images, adapt, phantom, teacher).

Same pattern as every command (``add_arguments`` and ``run``); they live apart from the
operator's commands (segment, run, scheduler, check, trends, ...) because they are used to
build and judge weights, not to measure studies. Read :mod:`worker.cli.research.train` first.
"""
