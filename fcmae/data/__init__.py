"""Images: the data sources (folders, shards, demo), decoding, samples and batches."""
