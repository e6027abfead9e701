"""The evaluators' eyes: an external concept classifier and a tiny open_clip, neither of
them the generator's own text encoder."""
