"""KV-cache compression methods.

Each method is one file (or one family file) built from the contract in :mod:`methods.api` and the
shared storage layouts in :mod:`methods.stores`. Nothing here imports the harness.
"""
