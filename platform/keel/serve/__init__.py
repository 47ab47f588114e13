"""Serving: an HTTP API over a registered model, on Ray Serve or plain FastAPI."""
