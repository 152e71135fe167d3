"""The trio shell of the data path: listeners, mTLS, and the byte pumps between them.

It reads configuration only from a ``Snapshot`` (through a ``SnapshotSource``) and never
talks to Consul or the central agent, so a control-plane outage never breaks traffic.
"""
