"""Examples that use p2pgrid's public APIs."""
