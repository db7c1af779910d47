"""Shared plumbing every TrialSync process uses: config, db, kafka, stack, logging, metrics, cli."""
