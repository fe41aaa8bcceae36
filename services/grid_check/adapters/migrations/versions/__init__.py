"""grid_check schema revisions."""
