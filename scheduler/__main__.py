"""``python -m scheduler``: the polling loop (``--once`` for a single poll)."""

from scheduler.main import main

raise SystemExit(main())
