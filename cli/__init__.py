"""The `w2wreg` command line: thin click commands over registry/ and ingest/."""
