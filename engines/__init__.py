"""wanrt.engines: runners for compiled engines behind one interface."""
