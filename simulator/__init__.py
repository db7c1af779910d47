"""A spec-driven Clinical Conductor stand-in with faults on demand."""
