"""DeepSeek models: large-context generation with token-exact chunking (map-reduce)."""
