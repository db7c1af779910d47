"""Extraction: page through Clinical Conductor and publish raw records to per-table topics."""
