"""Service discovery: the trio shells that talk to a catalog.

``discovery.consul`` is the only module that knows Consul's HTTP/JSON API: it maps
Consul's answers and transport failures once, at this edge, into ``ConsulProblem``
(``ConsulUnavailable`` / ``ConsulError``), so callers branch on ours, never on httpx's.
"""
