"""The OpenAI-compatible HTTP API over an ``Engine``: ``app.create_app`` mounts the completions routes and,
with a trainer attached at creation, the fine-tuning jobs routes. Needs the ``serving`` extra (FastAPI)."""
