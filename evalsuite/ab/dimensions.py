"""The vocabulary of a human rating: the four choices, the four scored dimensions, and the
gate metric names they become.

A rater compares two answers to the same turn: left better, right better, a tie, or both bad;
then scores each answer 1-5 on the four dimensions the fine-tuning practice names for people.
"""

from __future__ import annotations

CHOICES = ("left", "right", "tie", "both_bad")
# A choice seen from the candidate's side once the key is applied.
OUTCOMES = ("win", "tie", "loss", "both_bad")
DIMENSIONS = {
    "relevance": "relevance and helpfulness",
    "consistency": "consistency with earlier turns",
    "accuracy": "factual accuracy",
    "tone": "tone and style",
}
SCORE_MIN, SCORE_MAX = 1, 5
SIDES = ("left", "right")

HUMAN_WIN_RATE = "human_win_rate"
# Gate metrics: the candidate's win rate (ties and "both bad" count half) and its mean score on
# each dimension, compared with the baseline's.
HUMAN_METRICS = {
    HUMAN_WIN_RATE: "share of people's choices won by the candidate (ties and both-bad count half)",
    **{f"human_{d}": f"people's mean 1-5 score for {label}" for d, label in DIMENSIONS.items()},
}


def score_field(side: str, dimension: str) -> str:
    """The form field (and store column) holding one side's score on one dimension."""
    return f"{side}_{dimension}"
