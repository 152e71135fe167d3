"""meshagent: a universal service mesh for virtual machines and bare metal.

Architecture map (read docs/architecture.md for the long version).

Layers, lowest first; a module may import only from layers at or below its own:

1. ``snapshot``   the contract between control path and data path: frozen values
                  (``Snapshot``, ``Endpoint``, ...). Imports nothing from meshagent.
   ``config``     static per-process settings decoded from TOML (strict, path-qualified
                  errors). Imports only ``snapshot`` names.
2. ``pki``        keys, certificates, SPIFFE identities, CA issuance. Pure (no trio).
3. ``protocol``   sans-IO cores of the data path: the framing spoken between agents.
   ``routing``    pure decisions: endpoint balancing and passive ejection.
   Both take ``now`` and ``rng`` as parameters and never import trio.
4. ``dataplane``  the trio shell of the data path: listeners, TLS, the byte pumps.
                  Reads configuration only from a ``Snapshot``.
   ``discovery``  the trio shell of the control path: the Consul HTTP API adapter.
5. ``agent``      the agent process: supervisor, registration, health probes,
                  endpoint watching, signals, drain.
   ``cli``        the ``meshagent`` command line.

Glossary: *inbound* = mesh -> local app; *outbound* = local app -> mesh; *listener* =
a bound address with a direction; *service* = the logical name an app asks for;
*endpoint* = one ``host:port`` of a service's agent; *identity* = the SPIFFE ID in a
peer certificate (``spiffe://<mesh>/service/<service>``); *snapshot* = the immutable,
versioned configuration the data path serves from.
"""

__version__ = "0.1.0"
