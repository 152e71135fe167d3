"""Pure decisions over a snapshot: which endpoint next. Time and randomness are parameters."""
