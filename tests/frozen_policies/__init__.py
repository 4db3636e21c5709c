"""hitdensity as it was at commit 19070e5 (before session 8's cost work), frozen; prefix and
s3fifo as they were at bf65e47 (before their compiled cores, session 9), which the frozen auto's
minis use; auto as session 10 left it (re-frozen on purpose: its shared minis, S3FIFO_WARM and
PERSIST 3 change decisions; the Python version of policies/auto.py over these frozen minis).
Session 12 (H42, issue 15) added hitdensity's floor for the `once` class (_floor_reused) to the
frozen hitdensity on purpose: it changes hitdensity's and auto's decisions.
Session 14 (H56, issue 15) added to the frozen auto, on purpose, the two changes to its cold
switches (rate < 1): scores restart after one (FRESH), and a return to hitdensity resumes its own
aged tables (RESUME, _resumed); they change auto's decisions (four grid cells).

Kept only for tests/test_policy_auto_equal.py and test_policy_native_equal.py, which replay the same calls into these and
into kvbm.policies' current versions and compares every victim: a change meant to make them
cheaper must not change a single decision. Never imported by kvbm itself.
"""
