"""`python -m sfm`: the same as the `sfm` command."""

from sfm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
