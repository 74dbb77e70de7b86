"""sslkit: WebDataset shards -> DALI pretext pipelines -> a compact PyTorch DDP trainer."""

__version__ = "0.1.0"
