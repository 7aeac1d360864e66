"""OpenAI-compatible HTTP server over the engine: `create_app(...)` for embedding, `serve(args)` for the CLI."""

from cachedattention.server.app import create_app, serve

__all__ = ["create_app", "serve"]
