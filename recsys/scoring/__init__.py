"""Batch scoring: a registered model and a Parquet table of candidates in, scored and ranked Parquet out.

Lossless and resumable: partitions are planned up front, written atomically and recorded in a manifest.
"""
