"""One module per command: orchestration only (cli -> action -> transfer | storage | openqrm -> runner)."""
