"""The log server: HTTP API, storage, sequencing and proofs."""
