"""The Dataloop model app: `clip_adapter.ClipAdapter` over the `clip` library."""
