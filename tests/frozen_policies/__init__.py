"""hitdensity and auto as they were at commit 19070e5 (before session 8's cost work), frozen;
prefix and s3fifo as they were at bf65e47 (before their compiled cores, session 9), which the
frozen auto's minis use.

Kept only for tests/test_policy_auto_equal.py and test_policy_native_equal.py, which replay the same calls into these and
into kvbm.policies' current versions and compares every victim: a change meant to make them
cheaper must not change a single decision. Never imported by kvbm itself.
"""
