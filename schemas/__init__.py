"""The packed-record schema (placeholder until issue 3 lands)."""
