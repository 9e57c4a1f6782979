"""What the replay assets, checks, jobs and sensors share: the run's target, its slot lease, the step preamble."""
