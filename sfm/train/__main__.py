"""`python -m sfm.train CONFIG [KEY=VALUE ...]`: the same command as `sfm train`."""

import sys

from sfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
