"""Checks and benchmarks: `doctor` (environment report); benchmarks and GPU check scripts join here."""
