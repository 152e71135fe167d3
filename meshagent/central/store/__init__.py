"""The central agent's store: one ``Store`` protocol, two implementations.

* ``base``: record types, errors, the ``Store`` protocol and its rules (versions,
  mesh revisions, names).
* ``sqlite``: ``SqliteStore``, the embedded default (one file, WAL, migrations).
* ``consul_kv``: ``ConsulKvStore`` (Consul KV, check-and-set and transactions).

Leader election (a Consul session holding a lock key) is ``meshagent.central.election``.

Both stores pass the same test-suite (tests/central/test_store.py).
"""

from meshagent.central.store.base import (
    MAX_POLICIES_PER_APPLY,
    AuditRecord,
    Conflict,
    DataplaneRecord,
    MeshRecord,
    NotFound,
    PolicyKey,
    PolicyRecord,
    Store,
    StoreError,
    StoreUnavailable,
    TokenKind,
    TokenRecord,
    token_digest,
)
from meshagent.central.store.consul_kv import ConsulKvStore
from meshagent.central.store.sqlite import SqliteStore

__all__ = [
    "MAX_POLICIES_PER_APPLY",
    "AuditRecord",
    "Conflict",
    "ConsulKvStore",
    "DataplaneRecord",
    "MeshRecord",
    "NotFound",
    "PolicyKey",
    "PolicyRecord",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TokenKind",
    "TokenRecord",
    "token_digest",
]
