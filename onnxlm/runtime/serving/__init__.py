"""Serving: the continuous-batching scheduler and the OpenAI-compatible HTTP app.

The scheduler needs only the runtime; the app needs the `serve` extra (starlette, uvicorn) and is
imported on demand: `from onnxlm.runtime.serving.app import create_app`.
"""

from .scheduler import GenerationAborted, QueueFull, Scheduler, Stream

__all__ = ["GenerationAborted", "QueueFull", "Scheduler", "Stream"]
