"""`python -m lazymerge` is the `lazymerge` command."""

from lazymerge.cli import main

raise SystemExit(main())
