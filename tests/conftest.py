import os

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
