"""`python -m svq`: the command line."""

from .cli import main

raise SystemExit(main())
