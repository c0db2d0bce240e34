"""One module per question. Each is a thin function over the engine and the trace API that returns
a plain result dataclass; the CLI, the plots and the viewer only present that object."""
