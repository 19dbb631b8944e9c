"""Everything that produces a signature: key backends and the clients."""
