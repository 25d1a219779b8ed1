"""The shared kernel every hybridmesh service uses: bootstrap, telemetry, config, errors."""
