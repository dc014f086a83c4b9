"""scripts/bench.py in parts: load (clients), procstats (/proc), stack (processes), sweep, report, plots,
systems (names and labels). bench_tls.py uses the same parts."""
