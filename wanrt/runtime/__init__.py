"""Runtime transforms applied to built models: block streaming, memory planning."""
