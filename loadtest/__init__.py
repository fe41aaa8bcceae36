"""Load scenarios that drive the market through its public gRPC API and report what it accepted (see README.md)."""
