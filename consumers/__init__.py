"""Loading and transforming: consumer groups that upsert Bronze staging and run Silver/Gold procedures."""
