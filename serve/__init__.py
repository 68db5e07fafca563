"""`sdonnx serve`: AUTOMATIC1111's HTTP API (and OpenAI's image route, and a web page) over sdonnx.

app.py holds the routes, a1111.py the request and response shapes, worker.py the one generation
thread and its bounded queue, catalog.py the served models. Needs the `serve` extra (FastAPI and
uvicorn); nothing here imports torch. See docs/serve.md.
"""
