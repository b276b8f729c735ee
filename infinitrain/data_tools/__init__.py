"""Data preparation: tokenizers, segment-aligned zstd shards, the shard reader."""
