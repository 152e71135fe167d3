"""Policies: the documents operators write (TOML or JSON) and the code that checks them.

Layer 1, like ``config``: pure values and pure functions; imports only ``snapshot`` and
``config``. The central agent and an agent without one (``policies = "<dir>"``) load,
validate and compile the same documents with the same code.
"""
