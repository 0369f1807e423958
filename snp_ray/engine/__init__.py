"""Engine: job presets and the job bodies that jobs/ and the CLI share."""
