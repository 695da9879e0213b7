"""The one error of the rating workflow a user can fix: the message names the file or argument."""


class RatingSetError(ValueError):
    """A rating set, report or rating cannot be used as given; the message says what to change."""
