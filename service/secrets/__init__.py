"""Secrets: the in-memory cache and the CredStash store behind it."""
