"""Sans-IO cores of the data path: bytes in, events out. No trio, no sockets, no clocks."""
