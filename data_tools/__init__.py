"""Offline data tools: build a demo corpus, train a tokenizer, turn text into token shards."""
