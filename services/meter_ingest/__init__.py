"""meter_ingest package."""
