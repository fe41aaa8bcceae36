"""meter_ingest schema revisions."""
