"""hitdensity and auto as they were at commit 19070e5 (before session 8's cost work), frozen.

Kept only for tests/test_policy_auto_equal.py, which replays the same calls into these and
into kvbm.policies' current versions and compares every victim: a change meant to make them
cheaper must not change a single decision. Never imported by kvbm itself.
"""
