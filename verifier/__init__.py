"""Standalone verification for the log: formats, proofs, notes and bundles.

Nothing in this package talks to the log server's internals; it is what a
consumer or a monitor needs to check what the log hands out.
"""
