from tracer.cli import command

raise SystemExit(command())
