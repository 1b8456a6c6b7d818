"""Persistence: tables, engines, the sinks (storage.sink) and the admin queries.

Nothing here imports a dialect: storage knows the canonical model only.
"""
