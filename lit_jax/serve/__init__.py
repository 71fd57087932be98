"""The `serve` task: a local web page and JSON API over a trained decoder (session.py: model side; app.py: FastAPI)."""
