"""The applications on top: the CLI, the demo, the beamline profile, the listener, the IOC, replay."""
