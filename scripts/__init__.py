"""kvbench's command-line scripts, run from the repository root as modules: ``python -m scripts.<name>``
(``python -m scripts.regress``, ``python -m scripts.bench --smoke``); the root is then on the import path,
so no script patches ``sys.path``. By role: entry points at the top level, trainers in ``scripts/train/``
(``python -m scripts.train.lkv``), the papers' experiments and diagnostics in ``scripts/experiments/``
(``python -m scripts.experiments.fixed_contract``)."""
