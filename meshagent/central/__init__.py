"""The central agent (``meshagent central``): the control plane of many meshes.

It manages meshes (one per tenant, each with its own CA and trust domain), their
policies, join tokens and the dataplane inventory, and serves agents their snapshots.

The HTTP API (``central.api``: admin endpoints; ``central.dataplane_api``: what agents
call to join, renew, long-poll their config and report status) is a thin shell over
pure modules: ``meshes`` (mesh records, CAs, policy records), ``joining`` (checks of
join and renewal requests, CSR signing) and ``dataplanes`` (dataplane records and the
per-dataplane config compiler with the built-in catalog).

``central.store`` keeps that state behind one ``Store`` protocol with two
implementations that pass one shared test-suite:

* ``SqliteStore``: the embedded default, one file (WAL), one central process.
* ``ConsulKvStore``: Consul KV, for two or more central agents against one Consul;
  ``LeaderElection`` (a Consul session holding a lock key) picks the one replica that
  runs the jobs that must run once; every replica serves reads.
"""
