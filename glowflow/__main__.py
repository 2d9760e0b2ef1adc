"""``python -m glowflow``: the same program as the ``glowflow`` command."""

from glowflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
