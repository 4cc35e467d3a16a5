"""Web API and drawing page for the doodle classifier: `python -m app --model models/<name>.pt`."""
