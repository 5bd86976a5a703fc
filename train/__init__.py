"""CSM trainer: streams corpus shards and trains the backbone + decoder with compute amortization."""
