"""Persistence: tables, engines, the batched writer and the admin queries.

Nothing here imports a dialect: storage knows the canonical model only.
"""
