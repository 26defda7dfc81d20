"""Trainers: what produces the artefacts kvbench ships, each run from the repository root as a module.

- ``python -m scripts.train.tiny_model``: the embedded tiny model ``models/kvbench-tiny`` (it calls
  ``scripts.train.tiny_tokenizer`` for its tokenizer);
- ``python -m scripts.train.tiny_tokenizer``: that tokenizer alone;
- ``python -m scripts.train.lkv``: LKV's scorers and budgets, ``methods/data/lkv/<model dir>.safetensors``;
- ``python -m scripts.train.lloyd_max``: TurboQuant's Lloyd-Max codebooks, ``methods/data/lloyd_max.json``.
"""
