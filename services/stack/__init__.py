"""The local stack: every service on one machine with embedded defaults (`p2pgrid up`)."""
