"""The OpenAI-compatible HTTP front end of the gateway (Starlette + uvicorn): chat completions, Responses,
Conversations, models, health and metrics, on the gateway's own logic (``sinkserve.gateway.core``). No torch."""
