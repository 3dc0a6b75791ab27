"""Files and the console: atomic writes, PNG metadata, bundled tokenizers, logging, the error boundary."""
