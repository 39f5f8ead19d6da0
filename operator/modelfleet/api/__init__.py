"""The typed InferenceModel API (group modelfleet.io): the one source of the CRD schema."""
