"""Loss terms on the generator's outputs (configs in conf/objective/)."""
