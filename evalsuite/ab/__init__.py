"""People in the loop: blind side-by-side rating sets, the rating page, its ratings store, the
statistics over people's ratings, an optional model judge, and their merge into a run's report.

Everything here works from finished `evalsuite run` reports; only the model judge (`judge.py`)
talks to a server, and it does so through `clients/` like the rest of the eval suite.
"""
