"""`python -m sfm.train CONFIG [KEY=VALUE ...]`: run or resume a training run."""

from __future__ import annotations

import logging
import sys

from sfm.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    """Parse the config and overrides, train, print one summary line."""
    if not argv:
        print("usage: python -m sfm.train CONFIG [KEY=VALUE ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from sfm.train.loop import train

    print(train(cfg).line())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
