"""Example reward scripts, used by path (``rewards: [{name: rewards/brightness.py}]``): copy one and edit it."""
