"""Paper experiments and diagnostics: studies beyond one harness row, each run from the repository root as a
module (``python -m scripts.experiments.<name>``); results they commit live under ``results/``.

- ``quant_quality``: paper 1's quality measures of TurboQuant-style quantization (docs/PAPERS.md §1);
- ``ratequant_report``: paper 2's fitted distortion curves and perplexity by bit allocation (§2);
- ``fixed_contract``: paper 3's fixed-contract diagnostic of value-aware eviction (§3);
- ``lkv_length_generalization``: paper 4's open question, LKV trained at one length, evaluated at others (§4);
- ``index_recall``: how well sparse-read indexes (Louver, Quest, ...) find the keys that matter (§5);
- ``agreement``: how often a method's greedy answers differ from the full cache's, sample by sample.
"""
