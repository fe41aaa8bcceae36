"""grid_check package."""
