"""Reading and writing checkpoints: safetensors headers, `.bin` archives, shards, the Hub."""
