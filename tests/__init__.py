"""Tests of backdoor-scrub."""
