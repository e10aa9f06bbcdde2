"""Datasets as Parquet shards plus a manifest: the contract, ingest, synthesis, inspection.

``manifest`` and ``storage`` are the contract every reader uses; ``ingest``, ``synth`` and
``inspect`` write and check datasets (``hdm data ...``).
"""
