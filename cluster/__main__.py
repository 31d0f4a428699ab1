"""`python -m cluster` is the same as the `mtacluster` command."""

from cluster.cli import main

raise SystemExit(main())
