"""batchscore: train on Metaflow, score in batch, serve predictions from Redis."""

__version__ = "0.1.0"
