"""``python -m resilient_db`` runs the command-line tool."""

from .cli import main

raise SystemExit(main())
