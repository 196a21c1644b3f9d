"""Command-line argument parsers shared by the APL scripts."""
