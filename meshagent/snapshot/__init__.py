"""The contract between the control path and the data path: pure, frozen values.

The data path reads its configuration only from a ``Snapshot``; the supervisor builds
a new one whenever something changes (endpoints from Consul, later policies from the
central agent) and swaps it in whole. Nothing here imports the rest of meshagent.
"""
