"""The job layer: config, CLI, driver, topology (the only place that calls ray.remote), data, metrics."""
