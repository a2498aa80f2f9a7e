"""`python3 -m tools.toy_musdb OUT [--tracks N --seconds S --seed K]`: generate a toy MusDB-HQ.

The generator lives in `demucs.toy_musdb`, since training with `dset=toy` needs it too.
"""
import sys

from demucs.toy_musdb import get_parser, main  # noqa: F401  (get_parser: for the docs tests)

if __name__ == "__main__":
    sys.exit(main())
