"""Keys, certificates and SPIFFE identities: the mesh's PKI.

Theory of operation: each mesh has one CA whose certificate names the mesh's trust
domain, ``spiffe://<mesh>``. Every service gets a short-lived certificate whose only
subjectAltName is its SPIFFE ID, ``spiffe://<mesh>/service/<service>``; agents verify
peers against the CA and authorize them by that ID (``identity``). ``ca`` creates the
CA and issues certificates; ``files`` writes them atomically with safe modes and
checks a configured cert/key/CA triple before the agent serves with it.

This layer is pure and synchronous: no trio, no network, time passed in as ``now``.
A service's private key is generated on the host that uses it and never leaves it;
a central agent only ever signs public keys (``issue_leaf_for_public_key``).
"""
