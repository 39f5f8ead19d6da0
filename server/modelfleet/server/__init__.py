"""The ModelFleet router: one OpenAI-compatible endpoint in front of every model."""
