"""Serve a model with its fitted policies behind an OpenAI-compatible API: each request picks its policy and
strength (`python -m slim.serve MODEL --policy NAME=FOLDER ...`).

    engine    the batching engine: a queue, a short wait, a size cap, a policy per row, rows leave as they end
    app       the FastAPI routes (/v1/models, /v1/completions, /v1/chat/completions, /health)
    __main__  the command line
"""
