"""The OpenAI-compatible HTTP face of the server, over the same core as the gRPC one.

`schemas` (wire models), `convert` (wire <-> domain), `errors` (the HTTP status table), `routes`
(the FastAPI app), `edge` (request ids, protocol label, body limit, drain) and `serving` (uvicorn
on the shared event loop). server/app.py starts `HttpFront` when --http-port is set.
"""

from server.openai.serving import HttpFront

__all__ = ["HttpFront"]
