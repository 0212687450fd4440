"""Editorial delivery of a storyboard: its first cut and that cut as a timeline."""
