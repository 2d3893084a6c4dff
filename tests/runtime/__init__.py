"""Tests of lmql_backends.runtime (a package, so its test_chat.py and tests/server/test_chat.py can both exist)."""
