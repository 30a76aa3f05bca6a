"""Data: the built-in world, ingestion, cleaning, dedup and token shards."""
