"""kvbench's command-line scripts, run from the repository root as modules: ``python -m scripts.<name>``
(``python -m scripts.regress``, ``python -m scripts.bench --smoke``); the root is then on the import path,
so no script patches ``sys.path``."""
