"""Pure builders: one module per child kind, each turning an InferenceModel into one manifest dict.

No builder calls the API server; handlers apply what the builders return.
"""
