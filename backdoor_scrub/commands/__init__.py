"""What each subcommand does, from resolved options to report rows; the CLI only parses and prints."""
