"""`python -m lazymerge` is the `lazymerge` command."""

from lazymerge.cli import run

run()
