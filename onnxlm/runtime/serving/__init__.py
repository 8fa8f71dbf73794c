"""Serving: the OpenAI-compatible HTTP app (app.py) over an Engine and its continuous-batching scheduler
(onnxlm/runtime/scheduler.py), and the Ray Serve deployment (ray_serve.py).

Needs the `serve` extra (starlette, uvicorn); nothing below runtime/ imports this package.
"""
