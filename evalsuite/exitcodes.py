"""The eval suite's exit codes, for CI: one table shared by `run`, `promote` and `ab`."""

# 0: every candidate passed (or the promotion happened); 1: a regression (or a refused
# promotion); 2: an error the message explains (bad arguments, unreadable files, no server).
EXIT_PASS, EXIT_REGRESSION, EXIT_ERROR = 0, 1, 2
