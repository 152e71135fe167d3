"""The HTTP app the proxy tests talk to lives in the demo (it is a real process there)."""

from meshagent.demo.apps import serve_http_app

__all__ = ["serve_http_app"]
