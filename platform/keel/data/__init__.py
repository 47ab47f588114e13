"""Data stages: ingest raw files, validate them against a contract, preprocess and split."""
