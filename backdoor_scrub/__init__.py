"""backdoor-scrub: remove backdoors from image classifiers by activation-guided model editing."""

__version__ = "0.1.0"
