"""The ModelFleet operator: reconciles InferenceModels into Kubernetes objects."""
