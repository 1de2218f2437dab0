"""The HTTP API: routes, middlewares, authentication, schemas and problem+json errors."""
