"""OpenAI-compatible gateway: routes, upstream clients, streaming."""
