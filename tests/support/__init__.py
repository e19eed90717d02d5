"""Helpers shared by tests: local webhook and SMTP receivers (see receivers.py)."""
