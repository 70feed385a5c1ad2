"""Storage backends of the session registry: one contract, three implementations.

``base`` states the contract; ``memory``, ``sqlite`` and ``postgres_async`` (with its
generated twin ``postgres_sync``) implement it. Importing this package imports no driver.
"""
