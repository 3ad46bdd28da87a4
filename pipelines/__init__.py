"""Command-line entry points: thin argument parsing around one library call each."""
