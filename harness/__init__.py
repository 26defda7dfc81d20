"""The kvbench harness: engine, attention hook, runner, measurement, results."""
