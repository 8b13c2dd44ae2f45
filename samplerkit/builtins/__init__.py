"""Built-in processors, samplers and backends, registered as ordinary plugins."""
