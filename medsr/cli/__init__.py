"""Command-line tools: thin layers over the library (parse, call, report)."""
