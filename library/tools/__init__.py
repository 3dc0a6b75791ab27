"""Code behind the file tools in networks/ (inspect, resize, merge): reading network files into modules, SVD, verdicts."""
