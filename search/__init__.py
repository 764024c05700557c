"""The sweep service: sweep definitions, the Optuna and Ray Tune drivers, Pareto analysis, plots and export."""
