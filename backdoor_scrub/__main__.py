"""Entry point for `python -m backdoor_scrub`."""

from backdoor_scrub.cli import main

main()
