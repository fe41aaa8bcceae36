"""Order book schema revisions."""
