# Present so that pytest puts the repository root on sys.path: tests import `tests.harness.*`.
