"""Static per-process settings, read from TOML once at start."""
