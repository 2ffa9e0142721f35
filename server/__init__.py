"""`w2wreg serve`: a Hugging Face Hub-compatible server for model repos that indexes what is pushed,
the registry's own API under /api/w2w/, and a web page (see server.app.create_app)."""
