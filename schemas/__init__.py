"""Pydantic models of jobs, messages and configuration files."""
