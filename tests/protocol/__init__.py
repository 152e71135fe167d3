"""Pure tests of the sans-IO protocol cores: bytes in, events out."""
