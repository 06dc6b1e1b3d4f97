"""What each CLI command does, below the argument parsing: ten lines or less each, on the shared pieces."""
