"""Getting models in: importing LoRA files, folders and hub repos (training arrives with the ingest issue)."""
