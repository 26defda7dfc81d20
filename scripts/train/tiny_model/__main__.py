"""``python -m scripts.train.tiny_model``: train models/kvbench-tiny (see :mod:`scripts.train.tiny_model`)."""

from scripts.train.tiny_model.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
