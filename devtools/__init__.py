"""Development helpers shared by the demo, the tests and the benchmarks: a throwaway
redis-server, a worker subprocess, a tiny offline model. Not part of the service."""
