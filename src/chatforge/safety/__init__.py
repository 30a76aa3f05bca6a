"""Safety: a moderation classifier, a layered policy, a red-team suite and a release gate."""
