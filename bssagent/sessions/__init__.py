"""Session registry internals: the value type, validation, the cache and the storage backends."""
