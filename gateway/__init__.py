"""PagedFleet gateway: FastAPI, OpenAI-compatible API, job API (see gateway.app:create_app)."""
