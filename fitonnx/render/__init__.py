"""Views of every result: terminal tables, JSON, CSV and PNG."""
