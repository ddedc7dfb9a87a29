"""Resumable batch jobs (batch inference, preprocessing) on spot capacity: each item's result committed once.

    import spotsafe.batch
    spotsafe.batch.map(score, spotsafe.batch.parquet_rows("in.parquet"), "s3://bucket/scores", format="parquet")

Run the same command again after an interruption and it goes on where it stopped. See
:mod:`spotsafe.batch.layout` for what is kept at the location and why no result is lost or written twice.
Importing this module does not import torch.
"""

from spotsafe.batch.formats import ParquetRows, jsonl_rows, parquet_rows
from spotsafe.batch.job import BatchJob, BatchResult, Shard
from spotsafe.batch.layout import BatchSpec, ShardRecord
from spotsafe.batch.run import map

__all__ = [
    "BatchJob",
    "BatchResult",
    "BatchSpec",
    "ParquetRows",
    "Shard",
    "ShardRecord",
    "jsonl_rows",
    "map",
    "parquet_rows",
]
